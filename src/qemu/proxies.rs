//! Client-side bindings for QEMU's `org.qemu.Display1` objects (QEMU 10: ui/dbus-display1.xml).

use zbus::proxy;

pub const BUS_NAME: &str = "org.qemu";
pub const VM_PATH: &str = "/org/qemu/Display1/VM";
pub const LISTENER_PATH: &str = "/org/qemu/Display1/Listener";
pub const MAP_INTERFACE: &str = "org.qemu.Display1.Listener.Unix.Map";

pub fn console_path(id: u32) -> String {
    format!("/org/qemu/Display1/Console_{id}")
}

#[proxy(
    interface = "org.qemu.Display1.VM",
    default_service = "org.qemu",
    default_path = "/org/qemu/Display1/VM"
)]
pub trait Vm {
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property, name = "ConsoleIDs")]
    fn console_ids(&self) -> zbus::Result<Vec<u32>>;
}

#[proxy(interface = "org.qemu.Display1.Console", default_service = "org.qemu")]
pub trait Console {
    fn register_listener(&self, listener: zbus::OwnedFd) -> zbus::Result<()>;
    #[zbus(name = "SetUIInfo")]
    fn set_ui_info(
        &self,
        width_mm: u16,
        height_mm: u16,
        xoff: i32,
        yoff: i32,
        width: u32,
        height: u32,
    ) -> zbus::Result<()>;
    #[zbus(property)]
    fn label(&self) -> zbus::Result<String>;
    #[zbus(property, name = "Type")]
    fn type_(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn width(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn height(&self) -> zbus::Result<u32>;
}

#[proxy(interface = "org.qemu.Display1.Keyboard", default_service = "org.qemu")]
pub trait Keyboard {
    // Input is sent without waiting for replies (in order, on one connection): a viewer's
    // typing never waits for QEMU's main loop.
    #[zbus(no_reply)]
    fn press(&self, keycode: u32) -> zbus::Result<()>;
    #[zbus(no_reply)]
    fn release(&self, keycode: u32) -> zbus::Result<()>;
    #[zbus(property)]
    fn modifiers(&self) -> zbus::Result<u32>;
}

#[proxy(interface = "org.qemu.Display1.Mouse", default_service = "org.qemu")]
pub trait Mouse {
    #[zbus(no_reply)]
    fn press(&self, button: u32) -> zbus::Result<()>;
    #[zbus(no_reply)]
    fn release(&self, button: u32) -> zbus::Result<()>;
    #[zbus(no_reply)]
    fn set_abs_position(&self, x: u32, y: u32) -> zbus::Result<()>;
    #[zbus(no_reply)]
    fn rel_motion(&self, dx: i32, dy: i32) -> zbus::Result<()>;
    #[zbus(property)]
    fn is_absolute(&self) -> zbus::Result<bool>;
}

#[proxy(
    interface = "org.qemu.Display1.Audio",
    default_service = "org.qemu",
    default_path = "/org/qemu/Display1/Audio"
)]
pub trait Audio {
    fn register_out_listener(&self, listener: zbus::OwnedFd) -> zbus::Result<()>;
    fn register_in_listener(&self, listener: zbus::OwnedFd) -> zbus::Result<()>;
}

/// QEMU's side of the clipboard; ours is [`super::clipboard::ClipboardPeer`].
#[proxy(
    interface = "org.qemu.Display1.Clipboard",
    default_service = "org.qemu",
    default_path = "/org/qemu/Display1/Clipboard"
)]
pub trait Clipboard {
    fn register(&self) -> zbus::Result<()>;
    fn unregister(&self) -> zbus::Result<()>;
    fn grab(&self, selection: u32, serial: u32, mimes: &[&str]) -> zbus::Result<()>;
    fn release(&self, selection: u32) -> zbus::Result<()>;
    fn request(
        &self,
        selection: u32,
        mimes: &[&str],
    ) -> zbus::Result<(String, serde_bytes::ByteBuf)>;
}
