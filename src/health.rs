//! What the sidecar knows about its own health beyond "attached": the hook's expectations
//! against what the running QEMU actually has. It exists for one hazard (KubeVirt ≥ 1.9 with the
//! `Plugins` gate and any Plugin CR): a legacy hook sidecar's domain is then rebuilt through
//! KubeVirt's own structs, which drop `<audio type='dbus'>` and the dbus graphics `address`, and
//! nothing tells us except what QEMU exports. `/readyz` and the log say so.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;

/// How long after the domain was defined QEMU may take to join our bus before we call it lost.
pub const JOIN_DEADLINE: Duration = Duration::from_secs(120);

const HAZARD: &str = "KubeVirt dropped what our hook added to the domain. With the `Plugins` \
feature gate and any Plugin CR in the cluster, a hook sidecar's domain is rebuilt through \
KubeVirt's own structs, which drop <audio type='dbus'> and the graphics address. Run \
vdi-sidecar as a Plugin instead (--mode plugin, manifests/plugin/)";

#[derive(Default)]
struct State {
    /// The last domain we rewrote got `<audio type='dbus'>` (the VMI has a sound device).
    expect_audio: bool,
    /// When the hook last returned a rewritten domain.
    defined_at: Option<Instant>,
    /// QEMU on our bus: `Some(has_audio)` once attached.
    qemu_audio: Option<bool>,
    warned: bool,
    /// Why the last domain got no D-Bus display (no module pack for the launcher).
    no_display: Option<String>,
}

/// Shared between the hook, the display source and the web probes.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Mutex<State>>,
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The hook rewrote a domain (for Boot, or again for a read-back).
    pub fn domain_defined(&self, audio: bool) {
        let mut st = self.lock();
        st.expect_audio = audio;
        st.defined_at = Some(Instant::now());
        st.no_display = None;
    }

    /// The hook left the D-Bus display out of the domain, for `reason`: QEMU will not join our
    /// bus, and that is not KubeVirt's doing.
    pub fn display_left_out(&self, reason: String) {
        let mut st = self.lock();
        st.expect_audio = false;
        st.defined_at = None;
        st.no_display = Some(reason);
    }

    /// QEMU's display is attached; `audio`: it exports `/Audio` and our listener is registered.
    pub fn qemu_attached(&self, audio: bool) {
        let mut st = self.lock();
        st.qemu_audio = Some(audio);
        if st.expect_audio && !audio && !st.warned {
            st.warned = true;
            warn!("the VMI has a sound device but the running QEMU has no D-Bus audio: {HAZARD}");
        }
    }

    /// Problems worth an operator's attention, for `/readyz` (empty: none known).
    pub fn warnings(&self) -> Vec<String> {
        self.warnings_at(Instant::now())
    }

    fn warnings_at(&self, now: Instant) -> Vec<String> {
        let mut st = self.lock();
        let mut out = Vec::new();
        if let Some(why) = &st.no_display {
            out.push(format!("no D-Bus display: {why}"));
        }
        match (st.qemu_audio, st.defined_at) {
            (Some(false), _) if st.expect_audio => {
                out.push(format!(
                    "no guest audio although the VMI has a sound device: {HAZARD}"
                ));
            }
            (None, Some(at)) if now.duration_since(at) > JOIN_DEADLINE => {
                if !st.warned {
                    st.warned = true;
                    warn!(
                        secs = JOIN_DEADLINE.as_secs(),
                        "QEMU has not joined our bus since the domain was defined: {HAZARD}"
                    );
                }
                out.push(format!(
                    "QEMU has not joined our bus {} s after the domain was defined: {HAZARD}",
                    JOIN_DEADLINE.as_secs()
                ));
            }
            _ => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_audio_is_reported_only_when_it_was_expected() {
        let h = Health::default();
        h.domain_defined(false);
        h.qemu_attached(false);
        assert!(h.warnings().is_empty(), "no sound device, no audio: fine");
        let h = Health::default();
        h.domain_defined(true);
        h.qemu_attached(true);
        assert!(h.warnings().is_empty());
        h.qemu_attached(false);
        let w = h.warnings();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("--mode plugin"), "{w:?}");
    }

    #[test]
    fn a_display_left_out_is_said_and_not_blamed_on_kubevirt() {
        let h = Health::default();
        h.display_left_out("no pack for v1.7.0".into());
        let later = Instant::now() + JOIN_DEADLINE + Duration::from_secs(1);
        let w = h.warnings_at(later);
        assert_eq!(w, ["no D-Bus display: no pack for v1.7.0"]);
    }

    #[test]
    fn a_qemu_that_never_comes_is_reported_after_the_deadline() {
        let h = Health::default();
        assert!(h.warnings().is_empty(), "nothing defined yet");
        h.domain_defined(true);
        let now = Instant::now();
        assert!(h.warnings_at(now).is_empty());
        let later = now + JOIN_DEADLINE + Duration::from_secs(1);
        assert!(h.warnings_at(later)[0].contains("has not joined our bus"));
        h.qemu_attached(true);
        assert!(h.warnings_at(later).is_empty());
    }
}
