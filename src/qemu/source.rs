//! The display source: finds QEMU on the bus, attaches a listener to every graphic console, and
//! re-attaches by itself when QEMU goes away and comes back (VM restart, migration target).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};
use zbus::Connection;

use super::audio::{AudioHub, AudioOutListener, OUT_LISTENER_PATH};
use super::audio_in::{AudioInListener, IN_LISTENER_PATH, MicHub};
use super::clipboard::{ClipboardHub, ClipboardSettings};
use super::control::{ConsoleControl, ConsoleProxies};
use super::input::{InputSink, input_path};
use super::listener::listener_objects;
use super::listener_socket::Frames;
use super::parked::ParkedFrames;
use super::proxies::{
    AudioProxy, BUS_NAME, ConsoleProxy, KeyboardProxy, LISTENER_PATH, MouseProxy, VmProxy,
    console_path,
};
use crate::framebuffer::Framebuffer;
use crate::health::Health;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the bus {address}")]
    Bus {
        address: String,
        #[source]
        source: zbus::Error,
    },
    #[error("D-Bus call failed")]
    DBus(#[from] zbus::Error),
    #[error("cannot create the listener socket pair")]
    Socket(#[source] std::io::Error),
}

/// The consoles of the VM we are attached to, by QEMU console id. A console's framebuffer
/// outlives QEMU restarts, so consumers keep their handle.
#[derive(Clone)]
pub struct Consoles {
    inner: Arc<Mutex<BTreeMap<u32, Framebuffer>>>,
    /// Lowest graphic console id, the one viewers see by default.
    primary: Framebuffer,
    input: InputSink,
    control: ConsoleControl,
    input_target: Arc<watch::Sender<Option<ConsoleProxies>>>,
    audio: AudioHub,
    mic: MicHub,
    clipboard: ClipboardHub,
    health: Health,
}

impl Consoles {
    /// The console registry and the input task to spawn next to it.
    pub fn new() -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (input, control, input_target, task) = input_path();
        (
            Self {
                inner: Arc::default(),
                primary: Framebuffer::new(),
                input,
                control,
                input_target: Arc::new(input_target),
                audio: AudioHub::default(),
                mic: MicHub::default(),
                clipboard: ClipboardHub::default(),
                health: Health::default(),
            },
            task,
        )
    }

    /// What the hook expects of QEMU against what it has (see [`Health`]).
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Guest sound, for viewers that play it.
    pub fn audio(&self) -> AudioHub {
        self.audio.clone()
    }

    /// Where viewers send keyboard and pointer input (to the primary console).
    pub fn input(&self) -> InputSink {
        self.input.clone()
    }

    /// LEDs, pointer mode and resize requests of the primary console.
    pub fn control(&self) -> ConsoleControl {
        self.control.clone()
    }

    /// The guest's microphone.
    pub fn mic(&self) -> MicHub {
        self.mic.clone()
    }

    /// The VM's clipboard, shared by every viewer.
    pub fn clipboard(&self) -> ClipboardHub {
        self.clipboard.clone()
    }

    /// The default console's framebuffer (console 0 on every VM we know of).
    pub fn primary(&self) -> Framebuffer {
        self.primary.clone()
    }

    pub fn get(&self, id: u32) -> Option<Framebuffer> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn framebuffer(&self, id: u32, first: bool) -> Framebuffer {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id)
            .or_insert_with(|| {
                if first {
                    self.primary.clone()
                } else {
                    Framebuffer::new()
                }
            })
            .clone()
    }

    fn detach_all(&self) {
        self.input_target.send_replace(None);
        self.clipboard.detached();
        for fb in self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            fb.detach();
        }
    }
}

/// A live attachment: the p2p listener connections, dropped when QEMU goes away.
struct Attachment {
    _listeners: Vec<Connection>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Connects to a bus, retrying until it answers or `stop` is cancelled.
pub async fn connect_bus(address: &str, stop: &CancellationToken) -> Option<Connection> {
    let mut delay = Duration::from_millis(50);
    loop {
        match zbus::connection::Builder::address(address).build().await {
            Ok(c) => return Some(c),
            Err(e) => debug!(address, error = %e, "bus not reachable yet"),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// How the source attaches.
#[derive(Debug, Clone, Copy)]
pub struct SourceOptions {
    /// Ask QEMU for shared-memory frames (`Listener.Unix.Map`) where the surface allows it.
    pub shared_memory: bool,
    /// Hold whole-surface frames in QEMU until a viewer wants one (see `listener_socket`).
    /// `None`: only under a cgroup CPU or memory limit, where taking in every frame is what
    /// costs the budget; elsewhere frames are taken in as they come, for the lowest latency.
    pub hold_frames: Option<bool>,
    /// Which way clipboard text may go (with `Off` we never register with QEMU's clipboard).
    pub clipboard: ClipboardSettings,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            shared_memory: true,
            hold_frames: None,
            clipboard: ClipboardSettings::default(),
        }
    }
}

impl SourceOptions {
    fn holds_frames(&self) -> bool {
        self.hold_frames.unwrap_or_else(|| {
            let limits = super::listener_socket::limits();
            limits.cpus.is_some() || limits.memory.is_some()
        })
    }
}

/// Runs the source on `conn` until `stop`: attach whenever `org.qemu` has an owner.
pub async fn run(
    conn: Connection,
    consoles: Consoles,
    opts: SourceOptions,
    stop: CancellationToken,
) -> Result<(), Error> {
    let vm = VmProxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    // Subscribe before looking, so an owner appearing in between is not missed.
    let mut owners = vm.inner().receive_owner_changed().await?;
    let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
    let mut attachment = None;
    let mut has_owner = dbus
        .name_has_owner(BUS_NAME.try_into()?)
        .await
        .map_err(zbus::Error::from)?;
    loop {
        if has_owner && attachment.is_none() {
            match attach(&conn, &consoles, opts).await {
                Ok(a) => attachment = Some(a),
                Err(e) => {
                    warn!(error = %e, "cannot attach to QEMU's display; waiting for it to come back")
                }
            }
        }
        tokio::select! {
            owner = owners.next() => match owner {
                Some(Some(name)) => {
                    info!(owner = %name, "org.qemu appeared");
                    drop(attachment.take());
                    crate::metrics::global().qemu_attached(false);
                    has_owner = true;
                }
                Some(None) => {
                    info!("org.qemu went away; display detached");
                    drop(attachment.take());
                    crate::metrics::global().qemu_attached(false);
                    consoles.detach_all();
                    has_owner = false;
                }
                None => return Err(Error::DBus(zbus::Error::InputOutput(
                    std::io::Error::other("bus connection closed").into(),
                ))),
            },
            () = stop.cancelled() => return Ok(()),
        }
    }
}

async fn attach(
    conn: &Connection,
    consoles: &Consoles,
    opts: SourceOptions,
) -> Result<Attachment, Error> {
    let vm = VmProxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let name = vm.name().await.unwrap_or_default();
    let ids = vm.console_ids().await?;
    info!(vm = %name, ?ids, "attaching to QEMU's display");
    crate::metrics::global().set_vm("", &name, false);
    let mut listeners = Vec::new();
    let mut tasks = Vec::new();
    let mut first = true;
    for id in ids {
        // Cached properties, so Width/Height changes arrive as a stream.
        let console = ConsoleProxy::builder(conn)
            .path(console_path(id))
            .build()
            .await?;
        let kind = console.type_().await.unwrap_or_default();
        if kind != "Graphic" {
            debug!(console = id, kind, "skipping non-graphic console");
            continue;
        }
        let fb = consoles.framebuffer(id, first);
        if first {
            let path = console_path(id);
            // Cached eagerly: input decisions read IsAbsolute and Modifiers without a round trip,
            // and the cache follows PropertiesChanged.
            let keyboard = KeyboardProxy::builder(conn)
                .path(path.clone())
                .cache_properties(zbus::proxy::CacheProperties::Yes)
                .build()
                .await?;
            let mouse = MouseProxy::builder(conn)
                .path(path)
                .cache_properties(zbus::proxy::CacheProperties::Yes)
                .build()
                .await?;
            consoles.input_target.send_replace(Some(ConsoleProxies {
                console: console.clone(),
                keyboard,
                mouse,
                fb: fb.clone(),
            }));
        }
        first = false;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(Error::Socket)?;
        console
            .register_listener(zbus::OwnedFd::from(std::os::fd::OwnedFd::from(theirs)))
            .await?;
        // QEMU is the auth server on this socket and calls our objects: build a p2p *client*
        // that already serves both interfaces when the handshake completes.
        let parked = ParkedFrames::with_limit(if opts.holds_frames() {
            super::parked::MAX_IN_FLIGHT_BUDGET
        } else {
            super::parked::MAX_IN_FLIGHT
        });
        let (listener, map, taker) =
            listener_objects(id, fb.clone(), opts.shared_memory, parked.clone());
        // Our own socket halves: inline frames are read into a reused buffer, and under a
        // budget a whole-surface frame waits in QEMU until a viewer wants it.
        let frames = Frames {
            fb: fb.clone(),
            parked,
            hold: opts.holds_frames(),
        };
        let socket = super::listener_socket::split(ours, Some(frames)).map_err(Error::Socket)?;
        let p2p = zbus::connection::Builder::socket(socket)
            .p2p()
            .serve_at(LISTENER_PATH, listener)
            .serve_at(LISTENER_PATH, map)
            .serve_at(LISTENER_PATH, taker)
            .build()
            .await?;
        listeners.push(p2p);
        tasks.push(tokio::spawn(
            follow_size(console, fb).instrument(info_span!("console", id)),
        ));
        info!(console = id, "listener registered");
    }
    let audio = attach_audio(conn, consoles.audio()).await?;
    consoles.health().qemu_attached(audio.is_some());
    crate::metrics::global().qemu_attached(true);
    if audio.is_some() {
        listeners.extend(attach_mic(conn, consoles.mic.clone()).await?);
    }
    listeners.extend(audio);
    // A VM without a clipboard (or with another peer registered) still has a display.
    if let Err(e) = super::clipboard::attach(conn, &consoles.clipboard).await {
        warn!(error = %e, "clipboard not available");
    }
    Ok(Attachment {
        _listeners: listeners,
        tasks,
    })
}

/// Registers our audio out-listener when QEMU exports `/Audio` (only when its display names an
/// audiodev); `None` when the VM has no sound for us.
async fn attach_audio(conn: &Connection, hub: AudioHub) -> Result<Option<Connection>, Error> {
    let p2p = audio_listener(conn, Direction::Out, AudioOutListener::new(hub)).await?;
    if p2p.is_some() {
        info!("audio listener registered");
    }
    Ok(p2p)
}

/// Registers our microphone in-listener next to the out-listener.
async fn attach_mic(conn: &Connection, hub: MicHub) -> Result<Option<Connection>, Error> {
    let p2p = audio_listener(conn, Direction::In, AudioInListener::new(hub)).await?;
    if p2p.is_some() {
        info!("microphone listener registered");
    }
    Ok(p2p)
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    Out,
    In,
}

/// Hands QEMU one end of a socketpair as an audio listener and serves `listener` on the other.
/// Each listener gets its own connection: QEMU keeps one listener of a kind per peer.
async fn audio_listener<I: zbus::object_server::Interface>(
    conn: &Connection,
    direction: Direction,
    listener: I,
) -> Result<Option<Connection>, Error> {
    let audio = AudioProxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(Error::Socket)?;
    let fd = zbus::OwnedFd::from(std::os::fd::OwnedFd::from(theirs));
    let (registered, path) = match direction {
        Direction::Out => (audio.register_out_listener(fd).await, OUT_LISTENER_PATH),
        Direction::In => (audio.register_in_listener(fd).await, IN_LISTENER_PATH),
    };
    if let Err(e) = registered {
        info!(error = %e, ?direction, "no guest audio (QEMU's display has no audiodev)");
        return Ok(None);
    }
    let p2p = zbus::connection::Builder::unix_stream(ours)
        .p2p()
        .serve_at(path, listener)
        .build()
        .await?;
    Ok(Some(p2p))
}

/// QEMU 10.0 can switch surfaces without a `Scanout`; its Console `Width`/`Height` properties
/// tell the new size.
async fn follow_size(console: ConsoleProxy<'static>, fb: Framebuffer) {
    let mut widths = console.receive_width_changed().await;
    let mut heights = console.receive_height_changed().await;
    loop {
        tokio::select! {
            Some(_) = widths.next() => {}
            Some(_) = heights.next() => {}
            else => return,
        }
        let (Ok(w), Ok(h)) = (console.width().await, console.height().await) else {
            continue;
        };
        if fb.size() != (w, h) {
            debug!(w, h, "console size changed");
            crate::framebuffer::PathCounters::bump(&fb.counters().resized_without_scanout);
            if let Err(e) = fb.resize_hint(w, h) {
                warn!(error = %e, "console size refused");
            }
        }
    }
}

/// The whole display side for one bus: connects (retrying), spawns the input task, and runs
/// the source until `stop`. Returns the consoles at once so servers can attach to them.
pub fn spawn(
    address: String,
    opts: SourceOptions,
    stop: CancellationToken,
) -> (Consoles, tokio::task::JoinHandle<()>) {
    let (consoles, input_task) = Consoles::new();
    // Before anything attaches: `Off` must keep us from ever registering.
    consoles
        .clipboard()
        .configure(opts.clipboard.policy, opts.clipboard.limit);
    let input = tokio::spawn(input_task);
    let c = consoles.clone();
    let task = tokio::spawn(
        async move {
            // The bus can go away under us (dbus-daemon killed and restarted by `Bus`): then
            // connect again and wait for QEMU there, as at start.
            while let Some(conn) = connect_bus(&address, &stop).await {
                info!(%address, "display source connected to the bus");
                match run(conn, c.clone(), opts, stop.clone()).await {
                    Ok(()) => break,
                    Err(e) => warn!(error = %e, "display source lost the bus; reconnecting"),
                }
                c.detach_all();
                crate::metrics::global().qemu_attached(false);
                // Not a busy loop when the bus answers but keeps failing us.
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = stop.cancelled() => break,
                }
            }
            input.abort();
        }
        .instrument(info_span!("display")),
    );
    (consoles, task)
}
