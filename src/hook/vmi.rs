//! What the rewrite reads from the VirtualMachineInstance JSON that KubeVirt passes to the hook:
//! the VM's name (for logs) and per-VM overrides from `vdi.kubevirt.io/*` annotations.

use serde_json::Value;

use super::domain::{Error, MAX_INPUT_BYTES, RewriteOptions, VIDEO_MODELS};

/// `vdi.kubevirt.io/video`: model of the video device added when the domain has none.
pub const ANNOTATION_VIDEO: &str = "vdi.kubevirt.io/video";
/// `vdi.kubevirt.io/audio`: `"false"` leaves audio out of the domain.
pub const ANNOTATION_AUDIO: &str = "vdi.kubevirt.io/audio";
/// `vdi.kubevirt.io/drop-vnc`: `"true"` removes KubeVirt's own VNC graphics.
pub const ANNOTATION_DROP_VNC: &str = "vdi.kubevirt.io/drop-vnc";

/// The parts of a VMI the hook uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmiInfo {
    /// `namespace/name`, or empty when no VMI was given.
    pub name: String,
    pub video: Option<String>,
    pub audio: Option<bool>,
    pub drop_vnc: Option<bool>,
    /// `status.launcherContainerImageVersion`: the virt-launcher image the VM runs in (picks
    /// the QEMU module pack).
    pub launcher: Option<String>,
}

impl VmiInfo {
    /// Parses the VMI JSON. Empty input means "no VMI" (the offline `rewrite-domain` tool).
    pub fn parse(vmi: &[u8]) -> Result<Self, Error> {
        if vmi.len() > MAX_INPUT_BYTES {
            return Err(Error::TooLarge {
                what: "VMI JSON",
                len: vmi.len(),
            });
        }
        if vmi.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let value: Value =
            serde_json::from_slice(vmi).map_err(|e| Error::InvalidVmi(e.to_string()))?;
        let Value::Object(root) = &value else {
            return Err(Error::InvalidVmi("not a JSON object".into()));
        };
        let meta = root.get("metadata");
        let text = |key: &str| meta.and_then(|m| m.get(key)).and_then(Value::as_str);
        let name = match (text("namespace"), text("name")) {
            (Some(ns), Some(n)) => format!("{ns}/{n}"),
            (None, Some(n)) => n.to_owned(),
            _ => String::new(),
        };
        let annotations = meta.and_then(|m| m.get("annotations"));
        let annotation = |key: &'static str| -> Result<Option<&str>, Error> {
            match annotations.and_then(|a| a.get(key)) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(other) => Err(Error::InvalidAnnotation {
                    key,
                    value: other.to_string(),
                    reason: "annotation values are strings",
                }),
            }
        };

        let video = match annotation(ANNOTATION_VIDEO)? {
            None => None,
            Some(v) if VIDEO_MODELS.contains(&v) => Some(v.to_owned()),
            Some(v) => {
                return Err(Error::InvalidAnnotation {
                    key: ANNOTATION_VIDEO,
                    value: v.to_owned(),
                    reason: "expected one of virtio, vga, bochs, qxl, cirrus, ramfb",
                });
            }
        };
        let launcher = root
            .get("status")
            .and_then(|s| s.get("launcherContainerImageVersion"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 1024)
            .map(str::to_owned);
        Ok(Self {
            name,
            launcher,
            video,
            audio: parse_bool(ANNOTATION_AUDIO, annotation(ANNOTATION_AUDIO)?)?,
            drop_vnc: parse_bool(ANNOTATION_DROP_VNC, annotation(ANNOTATION_DROP_VNC)?)?,
        })
    }

    /// The operator's options with this VM's overrides applied.
    pub fn apply(&self, base: &RewriteOptions) -> RewriteOptions {
        let mut opts = base.clone();
        if let Some(v) = &self.video {
            opts.video_model.clone_from(v);
        }
        if let Some(a) = self.audio {
            opts.audio = a;
        }
        if let Some(d) = self.drop_vnc {
            opts.drop_vnc = d;
        }
        opts
    }
}

fn parse_bool(key: &'static str, value: Option<&str>) -> Result<Option<bool>, Error> {
    match value {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(v) => Err(Error::InvalidAnnotation {
            key,
            value: v.to_owned(),
            reason: "expected \"true\" or \"false\"",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_empty_vmi() {
        assert_eq!(VmiInfo::parse(b"").unwrap(), VmiInfo::default());
    }

    #[test]
    fn reads_name_and_annotations() {
        let vmi = br#"{"metadata":{"name":"vm1","namespace":"ns","annotations":{
            "vdi.kubevirt.io/video":"vga","vdi.kubevirt.io/audio":"false",
            "vdi.kubevirt.io/drop-vnc":"true","other":"x"}}}"#;
        let info = VmiInfo::parse(vmi).unwrap();
        assert_eq!(info.name, "ns/vm1");
        assert_eq!(info.video.as_deref(), Some("vga"));
        assert_eq!(info.audio, Some(false));
        assert_eq!(info.drop_vnc, Some(true));
        assert_eq!(info.launcher, None);
        let with_status = br#"{"metadata":{"name":"vm"},
            "status":{"launcherContainerImageVersion":"r/kubevirt/virt-launcher:v1.8.0"}}"#;
        assert_eq!(
            VmiInfo::parse(with_status).unwrap().launcher.as_deref(),
            Some("r/kubevirt/virt-launcher:v1.8.0")
        );
    }

    #[test]
    fn rejects_bad_vmi() {
        for bad in [
            &b"{"[..],
            b"[]",
            b"42",
            br#"{"metadata":{"annotations":{"vdi.kubevirt.io/video":"evil\" x=\""}}}"#,
            br#"{"metadata":{"annotations":{"vdi.kubevirt.io/audio":"yes"}}}"#,
            br#"{"metadata":{"annotations":{"vdi.kubevirt.io/audio":false}}}"#,
        ] {
            assert!(
                VmiInfo::parse(bad).is_err(),
                "accepted {}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
