//! RDP's clipboard (MS-RDPECLIP, the cliprdr static channel through ironrdp-server) on the VM's
//! shared clipboard. Text only, as CF_UNICODETEXT (Windows and FreeRDP make CF_TEXT from it),
//! with delayed rendering both ways: a guest copy is announced as a format list and its text
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
    /// The client's data for our paste request (`None`: it failed).
    Data(Option<String>),
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

impl CliprdrBackendFactory for ClipboardFactory {
    fn build_cliprdr_backend(&self) -> Box<dyn CliprdrBackend> {
        let (tx, rx) = mpsc::unbounded_channel();
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
    tx: mpsc::UnboundedSender<FromClient>,
}

ironrdp::core::impl_as_any!(Backend);

impl Backend {
    fn send(&self, m: FromClient) {
        let _ = self.tx.send(m);
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
        let text = if response.is_error() {
            None
        } else {
            // Our requests ask for CF_UNICODETEXT whenever the client has it.
            response
                .to_unicode_string()
                .or_else(|_| response.to_string())
                .ok()
        };
        self.send(FromClient::Data(text));
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
        vec![ClipboardFormat::new(ClipboardFormatId::CF_UNICODETEXT)]
    } else {
        Vec::new()
    };
    send(events, ClipboardMessage::SendInitiateCopy(formats));
}

/// Text as CF_UNICODETEXT wants it: CRLF line ends, UTF-16, NUL-terminated.
fn unicode_text(text: &str) -> OwnedFormatDataResponse {
    OwnedFormatDataResponse::new_unicode_string(&text.replace("\r\n", "\n").replace('\n', "\r\n"))
}

async fn run(
    mut viewer: ClipboardViewer,
    events: mpsc::UnboundedSender<ServerEvent>,
    mut rx: mpsc::UnboundedReceiver<FromClient>,
) {
    let mut ready = false;
    let (fetched_tx, mut fetched) = mpsc::channel::<Result<Arc<str>, ClipError>>(4);
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
                            send(&events, ClipboardMessage::SendInitiatePaste(format));
                        }
                    }
                    FromClient::Data(Some(text)) => {
                        let text = text.replace("\r\n", "\n");
                        if let Err(e) = viewer.provide(text) {
                            debug!(error = %e, "clipboard: RDP client text not taken");
                        }
                    }
                    FromClient::Data(None) => {
                        info!("clipboard: the RDP client could not give its text");
                    }
                    FromClient::Wants(format) => {
                        if format != ClipboardFormatId::CF_UNICODETEXT {
                            send(&events, ClipboardMessage::SendFormatData(
                                OwnedFormatDataResponse::new_error(),
                            ));
                            continue;
                        }
                        let paste = viewer.paste_task();
                        let tx = fetched_tx.clone();
                        tokio::spawn(async move {
                            let _ = tx.send(paste.await).await;
                        });
                    }
                }
            }
            Some(text) = fetched.recv() => {
                let response = match text {
                    Ok(t) => unicode_text(&t),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_goes_out_as_crlf_utf16_with_a_nul() {
        let r = unicode_text("a\nb — ✓\r\nc");
        let back = r.to_unicode_string().expect("utf-16");
        assert_eq!(back, "a\r\nb — ✓\r\nc");
        assert_eq!(&r.data()[r.data().len() - 2..], &[0, 0]);
    }
}
