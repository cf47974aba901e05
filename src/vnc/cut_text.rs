//! One RFB client's clipboard: what its cut-text messages do to the VM's clipboard, and what
//! it is sent when the guest copies. Classic clients get the guest's text pushed as Latin-1
//! (nothing when the text has characters outside it); Extended Clipboard clients are notified
//! and fetch it on demand. Fetching the guest's text can take QEMU's agent seconds, so it runs
//! on a task of its own and its result comes back through [`ClientClipboard::next`].

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::sync::mpsc;
use tracing::{debug, info, trace};

use super::clipboard::{self as clip, Extended};
use crate::qemu::clipboard::{ClipError, ClipboardViewer, Policy};

/// The guest's text fetched for this client.
type GuestText = Result<Arc<str>, ClipError>;

/// Something to tell the client.
pub enum Event {
    /// The guest copied, or its clipboard went empty.
    GuestCopy,
    GuestText(GuestText),
}

pub struct ClientClipboard {
    clip: ClipboardViewer,
    /// The client's Extended Clipboard actions (from its caps, or the spec's default).
    actions: u32,
    /// The client announced a copy (notify) whose text we asked for.
    announced: bool,
    results: (mpsc::Sender<GuestText>, mpsc::Receiver<GuestText>),
    /// A fetch is running (at most one per client, however many requests it sends); what its
    /// result is for: a `provide`, classic cut text, or both.
    fetching: bool,
    want_provide: bool,
    want_classic: bool,
    /// Bytes of an over-long cut text still to be discarded.
    skip: u64,
}

impl ClientClipboard {
    pub fn new(clip: ClipboardViewer) -> Self {
        Self {
            clip,
            actions: clip::flag::REQUEST | clip::flag::NOTIFY | clip::flag::PROVIDE,
            announced: false,
            results: mpsc::channel(1),
            fetching: false,
            want_provide: false,
            want_classic: false,
            skip: 0,
        }
    }

    /// The largest cut text the decoder may buffer.
    pub fn limit(&self) -> u32 {
        u32::try_from(self.clip.limit()).unwrap_or(u32::MAX)
    }

    fn on(&self) -> bool {
        self.clip.policy() != Policy::Off
    }

    /// Discards what is left of a skipped cut text from the front of `inbuf`; true while more
    /// is still to come.
    pub fn skipping(&mut self, inbuf: &mut BytesMut) -> bool {
        if self.skip == 0 {
            return false;
        }
        let n = inbuf
            .len()
            .min(usize::try_from(self.skip).unwrap_or(usize::MAX));
        inbuf.advance(n);
        self.skip -= n as u64;
        self.skip > 0
    }

    /// The next thing to tell the client (cancel-safe).
    pub async fn next(&mut self) -> Event {
        tokio::select! {
            r = self.clip.offers().changed() => match r {
                Ok(()) => Event::GuestCopy,
                Err(_) => std::future::pending().await,
            },
            Some(t) = self.results.1.recv() => Event::GuestText(t),
        }
    }

    /// Writes to `out` what `event` means for this client (`extended`: it listed the
    /// pseudo-encoding).
    pub fn event(&mut self, event: Event, extended: bool, out: &mut Vec<u8>) {
        let extended = extended && self.on();
        match event {
            Event::GuestCopy => {
                let offer = *self.clip.offers().borrow_and_update();
                if extended {
                    if self.actions & clip::flag::NOTIFY != 0 {
                        clip::notify(out, offer.text);
                    }
                } else if offer.text {
                    self.fetch(false);
                }
            }
            Event::GuestText(text) => {
                self.fetching = false;
                let provide = std::mem::take(&mut self.want_provide);
                let classic = std::mem::take(&mut self.want_classic);
                match text {
                    Ok(t) => {
                        if provide {
                            clip::provide(out, &t);
                        }
                        if classic {
                            match clip::string_to_latin1(&t) {
                                Some(latin1) => clip::server_cut_text(out, &latin1),
                                None => info!(
                                    "clipboard: the guest's text has characters outside \
                                     Latin-1; not sent to this classic VNC client (Extended \
                                     Clipboard clients get it)"
                                ),
                            }
                        }
                    }
                    Err(e) => {
                        info!(error = %e, "clipboard: the guest's text could not be fetched");
                        if provide {
                            clip::notify(out, false);
                        }
                    }
                }
                if !out.is_empty() {
                    debug!(bytes = out.len(), "clipboard: guest text sent");
                }
            }
        }
    }

    /// Asks for the guest's text; one fetch at a time, later asks share its result (a client
    /// repeating requests cannot pile up tasks).
    fn fetch(&mut self, provide: bool) {
        if provide {
            self.want_provide = true;
        } else {
            self.want_classic = true;
        }
        if self.fetching {
            return;
        }
        self.fetching = true;
        let paste = self.clip.paste_task();
        let tx = self.results.0.clone();
        tokio::spawn(async move {
            let _ = tx.send(paste.await).await;
        });
    }

    /// rfbproto: our caps on every SetEncodings that lists the pseudo-encoding. The text limit
    /// lets clients (TigerVNC) send text along with their copies.
    pub fn set_encodings(&mut self, extended: bool, out: &mut Vec<u8>) {
        if extended && self.on() {
            clip::server_caps(out, self.limit());
            if self.clip.offers().borrow().text {
                clip::notify(out, true);
            }
        }
    }

    /// Classic ClientCutText.
    pub fn classic(&self, latin1: &[u8]) {
        if self.on()
            && let Err(e) = self.clip.copy(clip::latin1_to_string(latin1))
        {
            debug!(error = %e, "clipboard: client text not taken");
        }
    }

    /// Cut text over the limit: its `len` bytes are dropped as they come.
    pub fn skipped(&mut self, len: u32, extended: bool) {
        self.clip.refused();
        info!(
            bytes = len,
            extended,
            limit = self.clip.limit(),
            "clipboard: cut text over the limit skipped"
        );
        self.skip = u64::from(len);
    }

    /// An Extended Clipboard message; replies go to `out`.
    pub fn extended(&mut self, extended: bool, body: &[u8], out: &mut Vec<u8>) {
        if !extended || !self.on() {
            debug!("extended cut text without the pseudo-encoding ignored");
            return;
        }
        let msg = match clip::decode_extended(body, self.clip.limit()) {
            Ok(m) => m,
            Err(e) => {
                self.clip.refused();
                info!(error = %e, "clipboard: extended cut text refused");
                return;
            }
        };
        trace!(?msg, "extended clipboard");
        match msg {
            Extended::Caps { actions, .. } => self.actions = actions,
            Extended::Notify { text: true } => {
                if self.clip.announce().is_ok() {
                    self.announced = true;
                    clip::request(out);
                }
            }
            Extended::Notify { text: false } | Extended::Provide { text: None } => {}
            Extended::Provide { text: Some(t) } => {
                let r = if std::mem::take(&mut self.announced) {
                    self.clip.provide(t)
                } else {
                    self.clip.copy(t)
                };
                if let Err(e) = r {
                    debug!(error = %e, "clipboard: client text not taken");
                }
            }
            Extended::Request { text: true } => self.fetch(true),
            Extended::Request { text: false } => {}
            Extended::Peek => clip::notify(out, self.clip.offers().borrow().text),
        }
    }
}
