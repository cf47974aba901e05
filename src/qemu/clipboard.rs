//! The VM's one clipboard. QEMU accepts a single `org.qemu.Display1.Clipboard` peer, so the
//! sidecar registers once (on the bus connection, where it also serves the peer object QEMU
//! calls back) and every viewer of every protocol shares it through a [`ClipboardHub`]:
//!
//! - a viewer's copy becomes a D-Bus `Grab` with the next serial (the last grab wins, QEMU's
//!   rules: the higher serial owns the clipboard, on a tie the client — we — wins);
//! - a guest copy (QEMU's `Grab`) is announced to every viewer ([`GuestOffer`]); the text is
//!   fetched once per offer, on the first viewer's demand, and shared;
//! - QEMU's `Request` (the guest pastes) is synchronous, with QEMU's main loop waiting: it is
//!   answered from the text the owning viewer sent, waiting at most [`PROVIDE_WAIT`] for a viewer
//!   that announced its text without sending it yet, and fails otherwise.
//!
//! Only text (`text/plain;charset=utf-8`, the one type QEMU 10 maps) and only the CLIPBOARD
//! selection. The operator's [`Policy`] and size limit apply to both directions.

use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use zbus::Connection;

use super::proxies::ClipboardProxy;

pub const CLIPBOARD_PATH: &str = "/org/qemu/Display1/Clipboard";
pub const TEXT_MIME: &str = "text/plain;charset=utf-8";
/// QEMU's `Clipboard` selection (Primary = 1 and Secondary = 2 are not shared).
pub const SELECTION_CLIPBOARD: u32 = 0;
/// Default size limit: QEMU's own vdagent buffer (`VDAGENT_BUFFER_LIMIT`).
pub const DEFAULT_LIMIT: usize = 1 << 20;
/// Largest text QEMU passes to the guest agent: its vdagent drops (with only a line in its own
/// log) a message over `VDAGENT_BUFFER_LIMIT` (1 MiB) counting the 28 bytes of message header,
/// selection and type. Viewer text over this is refused here, where the refusal is logged.
pub const QEMU_GUEST_MAX: usize = (1 << 20) - 28;
/// How long the guest's paste waits for a viewer that announced text but has not sent it.
pub const PROVIDE_WAIT: Duration = Duration::from_secs(1);
/// How long a viewer waits for the guest's text (QEMU itself gives its agent 5 s).
pub const FETCH_WAIT: Duration = Duration::from_millis(5500);
/// D-Bus grabs and releases queued for QEMU at most.
const COMMANDS: usize = 64;

/// Which way text may travel (`--clipboard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    #[default]
    Both,
    ToGuest,
    FromGuest,
    Off,
}

impl Policy {
    pub fn to_guest(self) -> bool {
        matches!(self, Policy::Both | Policy::ToGuest)
    }

    pub fn from_guest(self) -> bool {
        matches!(self, Policy::Both | Policy::FromGuest)
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "both" => Ok(Policy::Both),
            "to-guest" => Ok(Policy::ToGuest),
            "from-guest" => Ok(Policy::FromGuest),
            "off" => Ok(Policy::Off),
            _ => Err(format!(
                "clipboard policy {s:?}: expected both, to-guest, from-guest or off"
            )),
        }
    }
}

/// The operator's clipboard settings (`--clipboard`, `--clipboard-limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClipboardSettings {
    pub policy: Policy,
    /// Largest text, in bytes of UTF-8, either way.
    pub limit: usize,
}

impl Default for ClipboardSettings {
    fn default() -> Self {
        Self {
            policy: Policy::Both,
            limit: DEFAULT_LIMIT,
        }
    }
}

/// What the guest offers now. `generation` changes with every guest grab and release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestOffer {
    pub generation: u64,
    /// The guest owns the clipboard with text in it (and the policy lets it out).
    pub text: bool,
}

/// Why a transfer did not happen; front ends log it and tell their client what they can.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClipError {
    #[error("the clipboard policy forbids this direction")]
    Forbidden,
    #[error("{0} bytes of clipboard text (limit {1})")]
    TooLarge(usize, usize),
    #[error("the guest's clipboard text is not UTF-8")]
    NotUtf8,
    #[error("the guest offers no text")]
    Empty,
    #[error("no guest clipboard: QEMU is not attached or has no clipboard")]
    Detached,
    #[error("the guest did not send its clipboard in time")]
    Timeout,
    #[error("QEMU refused: {0}")]
    Qemu(String),
}

/// Transfers so far, for operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub to_guest: u64,
    pub from_guest: u64,
    pub refused: u64,
}

enum Owner {
    Nobody,
    Guest,
    /// A viewer's grab; its text, once it sent it.
    Viewer {
        id: u64,
        text: watch::Receiver<Option<Arc<str>>>,
        fill: watch::Sender<Option<Arc<str>>>,
    },
}

enum Cmd {
    Grab(u32),
    Release,
}

struct State {
    policy: Policy,
    limit: usize,
    /// QEMU's queue of grabs and releases, while registered.
    qemu: Option<(ClipboardProxy<'static>, mpsc::Sender<Cmd>)>,
    /// The session's grab counter.
    serial: u32,
    owner: Owner,
    generation: u64,
    /// The guest text of one generation, fetched once.
    cache: Option<(u64, Arc<str>)>,
    next_viewer: u64,
    counters: Counters,
}

struct Inner {
    state: Mutex<State>,
    offers: watch::Sender<GuestOffer>,
    /// One fetch of the guest's text at a time; the others wait and share its result.
    fetching: tokio::sync::Mutex<()>,
}

/// The clipboard shared by the QEMU peer and every viewer. Cheap to clone.
#[derive(Clone)]
pub struct ClipboardHub {
    inner: Arc<Inner>,
}

impl Default for ClipboardHub {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    policy: Policy::default(),
                    limit: DEFAULT_LIMIT,
                    qemu: None,
                    serial: 0,
                    owner: Owner::Nobody,
                    generation: 0,
                    cache: None,
                    next_viewer: 1,
                    counters: Counters::default(),
                }),
                offers: watch::channel(GuestOffer::default()).0,
                fetching: tokio::sync::Mutex::new(()),
            }),
        }
    }
}

impl ClipboardHub {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the operator's policy and size limit (before viewers come).
    pub fn configure(&self, policy: Policy, limit: usize) {
        let mut s = self.lock();
        s.policy = policy;
        s.limit = limit;
    }

    pub fn policy(&self) -> Policy {
        self.lock().policy
    }

    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// The limit for text going to the guest: ours, and what QEMU's agent channel carries.
    fn guest_bound(s: &State) -> usize {
        s.limit.min(QEMU_GUEST_MAX)
    }

    pub fn counters(&self) -> Counters {
        self.lock().counters
    }

    /// Whether QEMU accepted us as its clipboard peer.
    pub fn is_attached(&self) -> bool {
        self.lock().qemu.is_some()
    }

    /// A viewer's handle; its grab is released when it is dropped.
    pub fn viewer(&self) -> ClipboardViewer {
        let id = {
            let mut s = self.lock();
            s.next_viewer += 1;
            s.next_viewer
        };
        ClipboardViewer {
            hub: self.clone(),
            id,
            offers: self.inner.offers.subscribe(),
        }
    }

    /// QEMU took us as its peer: grabs and releases go to `proxy` from now on, in order.
    pub fn attached(&self, proxy: ClipboardProxy<'static>) {
        let (tx, mut rx) = mpsc::channel(COMMANDS);
        let calls = proxy.clone();
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                let r = match cmd {
                    Cmd::Grab(serial) => {
                        calls.grab(SELECTION_CLIPBOARD, serial, &[TEXT_MIME]).await
                    }
                    Cmd::Release => calls.release(SELECTION_CLIPBOARD).await,
                };
                if let Err(e) = r {
                    info!(error = %e, "clipboard: QEMU refused a grab or release");
                }
            }
        });
        let mut s = self.lock();
        s.qemu = Some((proxy, tx));
        s.serial = 0;
    }

    /// QEMU went away: the guest's offer is gone with it.
    pub fn detached(&self) {
        let mut s = self.lock();
        s.qemu = None;
        if matches!(s.owner, Owner::Guest) {
            s.owner = Owner::Nobody;
            self.announce(&mut s, false);
        }
    }

    fn announce(&self, s: &mut State, text: bool) {
        s.generation += 1;
        s.cache = None;
        let offer = GuestOffer {
            generation: s.generation,
            text: text && s.policy.from_guest(),
        };
        self.inner.offers.send_replace(offer);
    }

    fn send(s: &State, cmd: Cmd) {
        if let Some((_, tx)) = &s.qemu
            && tx.try_send(cmd).is_err()
        {
            warn!("clipboard: QEMU's queue is full; a grab or release was dropped");
        }
    }

    /// QEMU (re)started the session: serials count from 0 again.
    fn reset_serial(&self) {
        debug!("clipboard: serials reset");
        self.lock().serial = 0;
    }

    /// The guest copied (QEMU's `Grab`).
    fn guest_grab(&self, selection: u32, serial: u32, mimes: &[String]) {
        if selection != SELECTION_CLIPBOARD {
            return;
        }
        let mut s = self.lock();
        if serial < s.serial {
            debug!(
                serial,
                ours = s.serial,
                "clipboard: stale guest grab ignored"
            );
            return;
        }
        s.serial = serial;
        s.owner = Owner::Guest;
        let text = mimes.iter().any(|m| m == TEXT_MIME);
        debug!(serial, text, "clipboard: the guest copied");
        self.announce(&mut s, text);
    }

    /// The guest's clipboard went empty (QEMU's `Release`).
    fn guest_release(&self, selection: u32) {
        if selection != SELECTION_CLIPBOARD {
            return;
        }
        let mut s = self.lock();
        if matches!(s.owner, Owner::Guest) {
            s.owner = Owner::Nobody;
            self.announce(&mut s, false);
        }
    }

    /// QEMU's `Request`: the guest pastes what a viewer copied.
    async fn answer(&self, selection: u32, mimes: &[String]) -> Result<Arc<str>, ClipError> {
        if selection != SELECTION_CLIPBOARD || !mimes.iter().any(|m| m == TEXT_MIME) {
            return Err(ClipError::Empty);
        }
        let mut text = {
            let mut s = self.lock();
            if !s.policy.to_guest() {
                s.counters.refused += 1;
                info!("clipboard: the guest's paste refused by policy");
                return Err(ClipError::Forbidden);
            }
            match &s.owner {
                Owner::Viewer { text, .. } => text.clone(),
                _ => return Err(ClipError::Empty),
            }
        };
        let got = tokio::time::timeout(PROVIDE_WAIT, text.wait_for(Option::is_some)).await;
        let text = match got {
            Ok(Ok(t)) => t.clone(),
            _ => None,
        };
        let Some(text) = text else {
            info!("clipboard: the viewer did not send its text in time for the guest's paste");
            return Err(ClipError::Timeout);
        };
        let mut s = self.lock();
        s.counters.to_guest += 1;
        debug!(
            bytes = text.len(),
            "clipboard: viewer text pasted in the guest"
        );
        Ok(text)
    }

    /// The guest's text for the current offer: fetched from QEMU once, then shared.
    async fn fetch(&self) -> Result<Arc<str>, ClipError> {
        let wanted = {
            let mut s = self.lock();
            if !s.policy.from_guest() {
                s.counters.refused += 1;
                info!("clipboard: a viewer's paste of guest text refused by policy");
                return Err(ClipError::Forbidden);
            }
            if !matches!(s.owner, Owner::Guest) {
                return Err(ClipError::Empty);
            }
            if let Some((g, t)) = &s.cache
                && *g == s.generation
            {
                return Ok(t.clone());
            }
            s.generation
        };
        let _one = self.inner.fetching.lock().await;
        let (proxy, limit) = {
            let s = self.lock();
            if let Some((g, t)) = &s.cache
                && *g == wanted
            {
                return Ok(t.clone());
            }
            let Some((proxy, _)) = &s.qemu else {
                return Err(ClipError::Detached);
            };
            (proxy.clone(), s.limit)
        };
        let call = proxy.request(SELECTION_CLIPBOARD, &[TEXT_MIME]);
        let (mime, data) = match tokio::time::timeout(FETCH_WAIT, call).await {
            Err(_) => return Err(ClipError::Timeout),
            Ok(Err(e)) => return Err(ClipError::Qemu(e.to_string())),
            Ok(Ok(r)) => r,
        };
        let text = guest_text(&mime, data.into_vec(), limit);
        let mut s = self.lock();
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                s.counters.refused += 1;
                return Err(e);
            }
        };
        s.counters.from_guest += 1;
        if s.generation == wanted {
            s.cache = Some((wanted, text.clone()));
        }
        debug!(bytes = text.len(), "clipboard: guest text fetched");
        Ok(text)
    }
}

/// Checks what QEMU's `Request` returned: our type, within the limit, UTF-8 (a trailing NUL,
/// which some agents send, is dropped).
fn guest_text(mime: &str, mut data: Vec<u8>, limit: usize) -> Result<Arc<str>, ClipError> {
    if mime != TEXT_MIME {
        return Err(ClipError::Qemu(format!("unexpected type {mime:?}")));
    }
    if data.last() == Some(&0) {
        data.pop();
    }
    if data.len() > limit {
        info!(
            bytes = data.len(),
            limit, "clipboard: guest text over the limit refused"
        );
        return Err(ClipError::TooLarge(data.len(), limit));
    }
    String::from_utf8(data)
        .map(Arc::from)
        .map_err(|_| ClipError::NotUtf8)
}

/// One viewer's side of the clipboard.
pub struct ClipboardViewer {
    hub: ClipboardHub,
    id: u64,
    offers: watch::Receiver<GuestOffer>,
}

impl ClipboardViewer {
    pub fn policy(&self) -> Policy {
        self.hub.policy()
    }

    pub fn limit(&self) -> usize {
        self.hub.limit()
    }

    /// What the guest offers; `changed()` wakes on every guest copy and release.
    pub fn offers(&mut self) -> &mut watch::Receiver<GuestOffer> {
        &mut self.offers
    }

    /// The viewer copied `text`: it becomes the guest's clipboard.
    pub fn copy(&self, text: String) -> Result<(), ClipError> {
        self.grab(Some(text))
    }

    /// The viewer copied but sends the text only when asked (RFB notify, RDP format list):
    /// the guest's paste then waits up to [`PROVIDE_WAIT`] for [`Self::provide`].
    pub fn announce(&self) -> Result<(), ClipError> {
        self.grab(None)
    }

    /// The text of this viewer's announced copy (ignored if another copy came since).
    pub fn provide(&self, text: String) -> Result<(), ClipError> {
        let mut s = self.hub.lock();
        let limit = ClipboardHub::guest_bound(&s);
        if text.len() > limit {
            s.counters.refused += 1;
            info!(
                bytes = text.len(),
                limit, "clipboard: viewer text over the limit refused"
            );
            return Err(ClipError::TooLarge(text.len(), limit));
        }
        if let Owner::Viewer { id, fill, .. } = &s.owner
            && *id == self.id
        {
            fill.send_replace(Some(Arc::from(text)));
        }
        Ok(())
    }

    fn grab(&self, text: Option<String>) -> Result<(), ClipError> {
        let mut s = self.hub.lock();
        if !s.policy.to_guest() {
            s.counters.refused += 1;
            info!("clipboard: a viewer's copy refused by policy");
            return Err(ClipError::Forbidden);
        }
        let limit = ClipboardHub::guest_bound(&s);
        if let Some(t) = &text
            && t.len() > limit
        {
            s.counters.refused += 1;
            info!(
                bytes = t.len(),
                limit, "clipboard: viewer text over the limit refused"
            );
            return Err(ClipError::TooLarge(t.len(), limit));
        }
        debug!(
            bytes = text.as_ref().map(String::len),
            "clipboard: a viewer copied"
        );
        let (fill, rx) = watch::channel(text.map(Arc::from));
        let was_guest = matches!(s.owner, Owner::Guest);
        s.owner = Owner::Viewer {
            id: self.id,
            text: rx,
            fill,
        };
        s.serial = s.serial.wrapping_add(1);
        let serial = s.serial;
        ClipboardHub::send(&s, Cmd::Grab(serial));
        if was_guest {
            // The guest's offer is gone for everyone.
            self.hub.announce(&mut s, false);
        }
        Ok(())
    }

    /// The guest's text for the current offer.
    pub async fn paste(&self) -> Result<Arc<str>, ClipError> {
        self.hub.fetch().await
    }

    /// [`Self::paste`] as a future of its own, for a task.
    pub fn paste_task(
        &self,
    ) -> impl std::future::Future<Output = Result<Arc<str>, ClipError>> + Send + use<> {
        let hub = self.hub.clone();
        async move { hub.fetch().await }
    }

    /// A transfer the front end refused itself (malformed, over the limit): counted.
    pub fn refused(&self) {
        self.hub.lock().counters.refused += 1;
    }
}

impl Drop for ClipboardViewer {
    fn drop(&mut self) {
        let mut s = self.hub.lock();
        if let Owner::Viewer { id, .. } = &s.owner
            && *id == self.id
        {
            s.owner = Owner::Nobody;
            ClipboardHub::send(&s, Cmd::Release);
        }
    }
}

/// The object QEMU calls: `org.qemu.Display1.Clipboard` on our bus connection.
pub struct ClipboardPeer {
    hub: ClipboardHub,
}

impl ClipboardPeer {
    pub fn new(hub: ClipboardHub) -> Self {
        Self { hub }
    }
}

#[zbus::interface(name = "org.qemu.Display1.Clipboard")]
impl ClipboardPeer {
    fn register(&self) {
        self.hub.reset_serial();
    }

    fn unregister(&self) {
        debug!("clipboard: QEMU unregistered us");
    }

    fn grab(&self, selection: u32, serial: u32, mimes: Vec<String>) {
        self.hub.guest_grab(selection, serial, &mimes);
    }

    fn release(&self, selection: u32) {
        self.hub.guest_release(selection);
    }

    async fn request(
        &self,
        selection: u32,
        mimes: Vec<String>,
    ) -> zbus::fdo::Result<(String, ByteBuf)> {
        match self.hub.answer(selection, &mimes).await {
            Ok(text) => Ok((TEXT_MIME.to_owned(), ByteBuf::from(text.as_bytes()))),
            Err(e) => Err(zbus::fdo::Error::Failed(e.to_string())),
        }
    }

    #[zbus(property)]
    fn interfaces(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Serves our peer object on `conn` and registers with QEMU; the hub is told either way.
pub async fn attach(conn: &Connection, hub: &ClipboardHub) -> Result<(), zbus::Error> {
    if hub.policy() == Policy::Off {
        info!("clipboard: off by policy; not registering with QEMU");
        return Ok(());
    }
    conn.object_server()
        .at(CLIPBOARD_PATH, ClipboardPeer::new(hub.clone()))
        .await?;
    let proxy = ClipboardProxy::new(conn).await?;
    proxy.register().await?;
    hub.attached(proxy);
    info!(policy = ?hub.policy(), limit = hub.limit(), "clipboard registered with QEMU");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_say_which_way() {
        assert_eq!("both".parse(), Ok(Policy::Both));
        assert_eq!("to-guest".parse(), Ok(Policy::ToGuest));
        assert_eq!("from-guest".parse(), Ok(Policy::FromGuest));
        assert_eq!("off".parse(), Ok(Policy::Off));
        assert!("sideways".parse::<Policy>().is_err());
        assert!(Policy::ToGuest.to_guest() && !Policy::ToGuest.from_guest());
        assert!(!Policy::FromGuest.to_guest() && Policy::FromGuest.from_guest());
        assert!(!Policy::Off.to_guest() && !Policy::Off.from_guest());
    }

    #[test]
    fn guest_text_is_checked() {
        assert_eq!(
            guest_text(TEXT_MIME, b"hi\0".to_vec(), 10).as_deref(),
            Ok("hi")
        );
        assert_eq!(
            guest_text(TEXT_MIME, vec![b'a'; 11], 10),
            Err(ClipError::TooLarge(11, 10))
        );
        assert_eq!(
            guest_text(TEXT_MIME, vec![0xff, 0xfe], 10),
            Err(ClipError::NotUtf8)
        );
        assert!(matches!(
            guest_text("image/png", vec![], 10),
            Err(ClipError::Qemu(_))
        ));
    }

    #[tokio::test]
    async fn a_viewer_copy_answers_the_guest_paste_and_its_leaving_releases_it() {
        let hub = ClipboardHub::default();
        let a = hub.viewer();
        let mime = vec![TEXT_MIME.to_owned()];
        assert_eq!(hub.answer(0, &mime).await, Err(ClipError::Empty));
        a.copy("Grüße — 日本語".into()).expect("copy");
        assert_eq!(hub.answer(0, &mime).await.as_deref(), Ok("Grüße — 日本語"));
        // Another selection, another type: not ours.
        assert_eq!(hub.answer(1, &mime).await, Err(ClipError::Empty));
        assert_eq!(
            hub.answer(0, &["image/png".to_owned()]).await,
            Err(ClipError::Empty)
        );
        drop(a);
        assert_eq!(hub.answer(0, &mime).await, Err(ClipError::Empty));
        assert_eq!(hub.counters().to_guest, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_announced_copy_is_waited_for_but_only_briefly() {
        let hub = ClipboardHub::default();
        let a = hub.viewer();
        let mime = vec![TEXT_MIME.to_owned()];
        a.announce().expect("announce");
        let t = tokio::time::Instant::now();
        assert_eq!(hub.answer(0, &mime).await, Err(ClipError::Timeout));
        assert!(t.elapsed() >= PROVIDE_WAIT && t.elapsed() < PROVIDE_WAIT * 2);
        let h = hub.clone();
        let m = mime.clone();
        let waiting = tokio::spawn(async move { h.answer(0, &m).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        a.provide("late but in time".into()).expect("provide");
        assert_eq!(
            waiting.await.expect("join").as_deref(),
            Ok("late but in time")
        );
    }

    #[tokio::test]
    async fn the_last_copy_wins_and_guest_grabs_follow_the_serials() {
        let hub = ClipboardHub::default();
        let (a, mut b) = (hub.viewer(), hub.viewer());
        let mime = vec![TEXT_MIME.to_owned()];
        a.copy("from a".into()).expect("a");
        b.copy("from b".into()).expect("b");
        assert_eq!(hub.answer(0, &mime).await.as_deref(), Ok("from b"));
        // a leaving does not release b's copy.
        drop(a);
        assert_eq!(hub.answer(0, &mime).await.as_deref(), Ok("from b"));
        // Our serial is 2 now: a guest grab with a lower serial is stale.
        hub.guest_grab(0, 1, &mime);
        assert!(!b.offers().borrow().text);
        hub.guest_grab(0, 3, &mime);
        assert!(b.offers().borrow_and_update().text);
        assert_eq!(hub.answer(0, &mime).await, Err(ClipError::Empty));
        hub.guest_release(0);
        assert!(!b.offers().borrow_and_update().text);
        // A reset lets serials start over.
        hub.reset_serial();
        hub.guest_grab(0, 1, &mime);
        assert!(b.offers().borrow().text);
        // Not attached: the text cannot be fetched.
        assert_eq!(b.paste().await, Err(ClipError::Detached));
    }

    #[tokio::test]
    async fn policy_and_limit_refuse_and_count() {
        let hub = ClipboardHub::default();
        let mime = vec![TEXT_MIME.to_owned()];
        hub.configure(Policy::FromGuest, 8);
        let a = hub.viewer();
        assert_eq!(a.copy("x".into()), Err(ClipError::Forbidden));
        hub.configure(Policy::ToGuest, 8);
        assert_eq!(a.copy("123456789".into()), Err(ClipError::TooLarge(9, 8)));
        a.copy("12345678".into()).expect("at the limit");
        hub.guest_grab(0, 5, &mime);
        // The guest copied, but text may not leave it.
        assert!(!a.offers.borrow().text);
        assert_eq!(a.paste().await, Err(ClipError::Forbidden));
        assert_eq!(hub.counters().refused, 3);
    }
}
