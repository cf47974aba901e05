//! RDP's clipboard (MS-RDPECLIP, the cliprdr static channel through ironrdp-server) on the VM's
//! shared clipboard. Text only, as CF_UNICODETEXT and CF_TEXT (8-bit, taken as Latin-1; text
//! it cannot carry is refused rather than changed), with delayed rendering both ways: a guest copy is announced as a format list and its text
//! fetched when the client pastes; a client copy (its format list) is announced to the guest at
//! once and its text requested straight away, so the guest's paste finds it ready.
//!
//! ironrdp calls the backend synchronously from its session loop, so the backend only forwards
//! events to a task of the session; that task owns the viewer's [`ClipboardViewer`] (dropping it
//! when the session ends releases the viewer's copy) and answers through the server's events.

use std::sync::Arc;

use ironrdp::cliprdr::backend::{ClipboardMessage, CliprdrBackend, CliprdrBackendFactory};
use ironrdp::cliprdr::pdu::{
    ClipboardFormat, ClipboardFormatId, ClipboardGeneralCapabilityFlags, FileContentsRequest,
    FileContentsResponse, FormatDataRequest, FormatDataResponse, LockDataId,
    OwnedFormatDataResponse,
};
use ironrdp_server::{CliprdrServerFactory, ServerEvent, ServerEventSender};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::qemu::clipboard::{ClipError, ClipboardHub, ClipboardViewer};

/// What the client's cliprdr channel said.
#[derive(Debug)]
enum FromClient {
    Ready,
    /// The client copied; these are its formats.
    Copy(Vec<ClipboardFormatId>),
    /// The client's data for our paste request, as it came (`None`: it failed).
    Data(Option<Vec<u8>>),
    /// The client pastes: it wants the guest's text in this format.
    Wants(ClipboardFormatId),
}

/// Builds one backend (and its task) per RDP connection.
pub struct ClipboardFactory {
    hub: ClipboardHub,
    events: Option<mpsc::UnboundedSender<ServerEvent>>,
}

impl ClipboardFactory {
    pub fn new(hub: ClipboardHub) -> Self {
        Self { hub, events: None }
    }
}

impl std::fmt::Debug for ClipboardFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipboardFactory").finish_non_exhaustive()
    }
}

impl ServerEventSender for ClipboardFactory {
    fn set_sender(&mut self, sender: mpsc::UnboundedSender<ServerEvent>) {
        self.events = Some(sender);
    }
}

/// Client events queued for the session's task at most; a client that floods cliprdr loses
/// the excess (logged), it never grows a queue.
const QUEUE: usize = 64;

impl CliprdrBackendFactory for ClipboardFactory {
    fn build_cliprdr_backend(&self) -> Box<dyn CliprdrBackend> {
        let (tx, rx) = mpsc::channel(QUEUE);
        if let Some(events) = self.events.clone() {
            tokio::spawn(run(self.hub.viewer(), events, rx));
        }
        Box::new(Backend { tx })
    }
}

impl CliprdrServerFactory for ClipboardFactory {}

/// The backend ironrdp calls; it only forwards.
#[derive(Debug)]
struct Backend {
    tx: mpsc::Sender<FromClient>,
}

ironrdp::core::impl_as_any!(Backend);

impl Backend {
    fn send(&self, m: FromClient) {
        if let Err(mpsc::error::TrySendError::Full(m)) = self.tx.try_send(m) {
            info!(dropped = ?m, "clipboard: RDP client sends cliprdr faster than it is handled");
        }
    }
}

impl CliprdrBackend for Backend {
    fn temporary_directory(&self) -> &str {
        // No file transfer: nothing is ever written there.
        "/nonexistent"
    }

    fn client_capabilities(&self) -> ClipboardGeneralCapabilityFlags {
        ClipboardGeneralCapabilityFlags::USE_LONG_FORMAT_NAMES
    }

    fn on_ready(&mut self) {
        self.send(FromClient::Ready);
    }

    fn on_request_format_list(&mut self) {
        self.send(FromClient::Ready);
    }

    fn on_process_negotiated_capabilities(&mut self, _: ClipboardGeneralCapabilityFlags) {}

    fn on_remote_copy(&mut self, formats: &[ClipboardFormat]) {
        self.send(FromClient::Copy(formats.iter().map(|f| f.id()).collect()));
    }

    fn on_format_data_request(&mut self, request: FormatDataRequest) {
        self.send(FromClient::Wants(request.format));
    }

    fn on_format_data_response(&mut self, response: FormatDataResponse<'_>) {
        let data = (!response.is_error()).then(|| response.data().to_vec());
        self.send(FromClient::Data(data));
    }

    fn on_file_contents_request(&mut self, _: FileContentsRequest) {}

    fn on_file_contents_response(&mut self, _: FileContentsResponse<'_>) {}

    fn on_lock(&mut self, _: LockDataId) {}

    fn on_unlock(&mut self, _: LockDataId) {}
}

fn send(events: &mpsc::UnboundedSender<ServerEvent>, m: ClipboardMessage) {
    let _ = events.send(ServerEvent::Clipboard(m));
}

/// Tells the client what the guest offers now (an empty list: nothing).
fn announce(viewer: &mut ClipboardViewer, events: &mpsc::UnboundedSender<ServerEvent>) {
    let offer = *viewer.offers().borrow_and_update();
    let formats = if offer.text {
        vec![
            ClipboardFormat::new(ClipboardFormatId::CF_UNICODETEXT),
            ClipboardFormat::new(ClipboardFormatId::CF_TEXT),
        ]
    } else {
        Vec::new()
    };
    send(events, ClipboardMessage::SendInitiateCopy(formats));
}

fn crlf(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\n', "\r\n")
}

/// The guest's text in the format the client asked for: CF_UNICODETEXT (UTF-16LE) or CF_TEXT
/// (8-bit, taken as Latin-1), CRLF line ends, NUL-terminated. `None` when CF_TEXT cannot carry
/// it (a character outside Latin-1): an error then, not a changed text.
fn encode(format: ClipboardFormatId, text: &str) -> Option<OwnedFormatDataResponse> {
    if format == ClipboardFormatId::CF_UNICODETEXT {
        return Some(OwnedFormatDataResponse::new_unicode_string(&crlf(text)));
    }
    if format != ClipboardFormatId::CF_TEXT {
        return None;
    }
    let mut bytes: Vec<u8> = crlf(text)
        .chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect::<Option<_>>()?;
    bytes.push(0);
    Some(OwnedFormatDataResponse::new_data(bytes))
}

/// The client's data in `format`, up to its NUL; line ends made LF. `None`: not text.
pub fn decode(format: ClipboardFormatId, data: &[u8]) -> Option<String> {
    let text = if format == ClipboardFormatId::CF_UNICODETEXT {
        let units: Vec<u16> = data
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        String::from_utf16(&units).ok()?
    } else {
        data.iter()
            .take_while(|&&b| b != 0)
            .map(|&b| char::from(b))
            .collect()
    };
    Some(text.replace("\r\n", "\n"))
}

async fn run(
    mut viewer: ClipboardViewer,
    events: mpsc::UnboundedSender<ServerEvent>,
    mut rx: mpsc::Receiver<FromClient>,
) {
    let mut ready = false;
    // The format we asked the client for.
    let mut asked = ClipboardFormatId::CF_UNICODETEXT;
    // One fetch at a time; requests that come meanwhile wait for its result (in order).
    let (fetched_tx, mut fetched) = mpsc::channel::<Result<Arc<str>, ClipError>>(1);
    let mut waiting: Vec<ClipboardFormatId> = Vec::new();
    loop {
        tokio::select! {
            r = viewer.offers().changed() => {
                if r.is_err() {
                    return;
                }
                if ready {
                    announce(&mut viewer, &events);
                }
            }
            m = rx.recv() => {
                let Some(m) = m else {
                    // The session ended; dropping the viewer releases its copy.
                    return;
                };
                match m {
                    FromClient::Ready => {
                        ready = true;
                        if viewer.offers().borrow().text {
                            announce(&mut viewer, &events);
                        }
                    }
                    FromClient::Copy(formats) => {
                        let format = [ClipboardFormatId::CF_UNICODETEXT, ClipboardFormatId::CF_TEXT]
                            .into_iter()
                            .find(|f| formats.contains(f));
                        if let Some(format) = format
                            && viewer.announce().is_ok()
                        {
                            // Fetch now: the guest's paste then finds the text waiting.
                            asked = format;
                            send(&events, ClipboardMessage::SendInitiatePaste(format));
                        }
                    }
                    FromClient::Data(Some(data)) => match decode(asked, &data) {
                        Some(text) => {
                            if let Err(e) = viewer.provide(text) {
                                debug!(error = %e, "clipboard: RDP client text not taken");
                            }
                        }
                        None => {
                            viewer.refused();
                            info!("clipboard: the RDP client's text is not valid UTF-16");
                        }
                    },
                    FromClient::Data(None) => {
                        info!("clipboard: the RDP client could not give its text");
                    }
                    FromClient::Wants(format) => {
                        // Responses carry no format: the client pairs them with its requests
                        // in order, so a refusal waits its turn behind a fetch.
                        let text = [ClipboardFormatId::CF_UNICODETEXT, ClipboardFormatId::CF_TEXT]
                            .contains(&format);
                        if (!text && waiting.is_empty()) || waiting.len() >= QUEUE {
                            send(&events, ClipboardMessage::SendFormatData(
                                OwnedFormatDataResponse::new_error(),
                            ));
                            continue;
                        }
                        waiting.push(format);
                        if waiting.len() == 1 {
                            let paste = viewer.paste_task();
                            let tx = fetched_tx.clone();
                            tokio::spawn(async move {
                                let _ = tx.send(paste.await).await;
                            });
                        }
                    }
                }
            }
            Some(text) = fetched.recv() => {
                // Every request is answered, each with one response, in order.
                for format in waiting.drain(..) {
                    let response = match text.as_ref().map(|t| encode(format, t)) {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            info!(?format, "clipboard: the guest's text cannot go in this format");
                            OwnedFormatDataResponse::new_error()
                        }
                        Err(e) => {
                            info!(error = %e, "clipboard: the guest's text could not be fetched");
                            OwnedFormatDataResponse::new_error()
                        }
                    };
                    send(&events, ClipboardMessage::SendFormatData(response));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_goes_out_as_crlf_with_a_nul_in_either_format() {
        let u = encode(ClipboardFormatId::CF_UNICODETEXT, "a\nb — ✓\r\nc").expect("unicode");
        assert_eq!(u.to_unicode_string().expect("utf-16"), "a\r\nb — ✓\r\nc");
        assert_eq!(&u.data()[u.data().len() - 2..], &[0, 0]);
        let t = encode(ClipboardFormatId::CF_TEXT, "café\n").expect("latin-1");
        assert_eq!(t.data(), b"caf\xe9\r\n\0");
        assert!(encode(ClipboardFormatId::CF_TEXT, "日本語").is_none());
        assert!(encode(ClipboardFormatId::new(49_000), "x").is_none());
    }

    #[test]
    fn client_text_is_read_up_to_its_nul_with_lf_line_ends() {
        let utf16: Vec<u8> = "x\r\nÄ ✓\0junk"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert_eq!(
            decode(ClipboardFormatId::CF_UNICODETEXT, &utf16).as_deref(),
            Some("x\nÄ ✓")
        );
        // An odd trailing byte is ignored; a lone surrogate is not text.
        assert_eq!(
            decode(ClipboardFormatId::CF_UNICODETEXT, &[b'a', 0, b'b']).as_deref(),
            Some("a")
        );
        assert_eq!(
            decode(ClipboardFormatId::CF_UNICODETEXT, &[0x00, 0xd8]),
            None
        );
        assert_eq!(
            decode(ClipboardFormatId::CF_TEXT, b"caf\xe9\r\n\0x").as_deref(),
            Some("café\n")
        );
    }
}
