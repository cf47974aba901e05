#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into fuzz/seeds/<target>/.

The seeds are the messages the real clients and peers send, written out from their protocols:
TigerVNC's, noVNC's and gtk-vnc's handshakes and SetEncodings lists, noVNC's WebSocket upgrade
and masked frames, mstsc/FreeRDP's X.224 Connection Request and fast-path input, virt-launcher's
HTTP/2 preface and hook calls, KubeVirt's domains (tests/data/domains), QEMU's listener calls
(D-Bus marshalling as QEMU 10 sends it) and RDP AUDIO_INPUT messages. Rerun after a protocol
change; libFuzzer grows its own corpus from these (fuzz/corpus/, not committed).
"""
import json
import os
import struct
import zlib

ROOT = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(ROOT, "seeds")


def put(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- RFB client messages -------------------------------------------------------------------
def set_pixel_format(bpp=32, depth=24, be=0, rmax=255, gmax=255, bmax=255, rs=16, gs=8, bs=0):
    return struct.pack(">BxxxBBBBHHHBBBxxx", 0, bpp, depth, be, 1, rmax, gmax, bmax, rs, gs, bs)


def set_encodings(encs):
    return struct.pack(">BxH", 2, len(encs)) + b"".join(struct.pack(">i", e) for e in encs)


def update_request(inc, x, y, w, h):
    return struct.pack(">BBHHHH", 3, inc, x, y, w, h)


def key(down, sym):
    return struct.pack(">BBxxI", 4, down, sym)


def pointer(mask, x, y):
    return struct.pack(">BBHH", 5, mask, x, y)


def cut_text(text):
    return struct.pack(">BxxxI", 6, len(text)) + text


def ext_clip(flags, payload=b""):
    body = struct.pack(">I", flags) + payload
    return struct.pack(">Bxxxi", 6, -len(body)) + body


CLIP_TEXT, CLIP_CAPS, CLIP_REQUEST, CLIP_PEEK, CLIP_NOTIFY, CLIP_PROVIDE = (
    1, 1 << 24, 1 << 25, 1 << 26, 1 << 27, 1 << 28)
TIGERVNC_ENCODINGS = [7, 16, 5, 0, 1, -239, -224, -223, -308, -307, -312, -313, -258, -261,
                      0xC0A1E5CE - (1 << 32), -256 + 2, -32 + 8]
NOVNC_ENCODINGS = [7, 16, 5, 1, 0, -24, -256 + 2, -239, -224, -223, -308, -309, -312, -313,
                   -258, -259, 0xC0A1E5CE - (1 << 32), 50]
GTKVNC_ENCODINGS = [16, 7, 5, 0, 1, -239, -240, -223, -257, -258, -261, -308, -24]

provide = zlib.compress(struct.pack(">I", 12) + b"hello\r\nclip\x00")
messages = [
    set_pixel_format(),
    set_pixel_format(16, 16, 0, 31, 63, 31, 11, 5, 0),
    set_pixel_format(8, 8, 0, 7, 7, 3, 0, 3, 6),
    set_encodings(TIGERVNC_ENCODINGS),
    set_encodings(NOVNC_ENCODINGS),
    set_encodings(GTKVNC_ENCODINGS),
    update_request(0, 0, 0, 1024, 768),
    update_request(1, 0, 0, 1024, 768),
    key(1, 0xFF0D), key(0, 0xFF0D), key(1, ord("a")), key(0, ord("a")),
    pointer(1, 100, 100), pointer(0, 100, 100), pointer(8, 5, 5), pointer(16, 5, 5),
    cut_text(b"copied from a classic client \xe9"),
    ext_clip(CLIP_CAPS | CLIP_TEXT | CLIP_REQUEST | CLIP_PEEK | CLIP_NOTIFY | CLIP_PROVIDE,
             struct.pack(">I", 20 << 20)),
    ext_clip(CLIP_NOTIFY | CLIP_TEXT), ext_clip(CLIP_REQUEST | CLIP_TEXT),
    ext_clip(CLIP_PEEK), ext_clip(CLIP_PROVIDE | CLIP_TEXT, provide),
    struct.pack(">BBHII", 255, 0, 1, 0xFF0D, 0x1C),        # QEMU extended key event
    struct.pack(">BBH", 255, 1, 0),                       # QEMU audio: enable
    struct.pack(">BBHBBI", 255, 1, 2, 3, 2, 44100),       # QEMU audio: set format
    struct.pack(">BBHHHH", 150, 1, 0, 0, 640, 480),       # EnableContinuousUpdates
    struct.pack(">BxxxIB", 248, 0x80000002, 4) + b"sync",  # Fence
    struct.pack(">BxHHBxIHHHHI", 251, 1280, 800, 1, 0, 0, 0, 1280, 800, 0),  # SetDesktopSize
]
for i, m in enumerate(messages):
    put("rfb_messages", f"msg-{i:02}", bytes([0x10]) + m)
put("rfb_messages", "tigervnc-start", bytes([0xfe]) + set_pixel_format() +
    set_encodings(TIGERVNC_ENCODINGS) + update_request(0, 0, 0, 640, 480) + key(1, 0x61))
put("rfb_messages", "novnc-start", bytes([0x31]) + b"".join(messages[3:12]))
put("rfb_messages", "all", bytes([0x02]) + b"".join(messages))

# ---- whole VNC connections ------------------------------------------------------------------
session_tail = (set_pixel_format() + set_encodings(NOVNC_ENCODINGS) + update_request(0, 0, 0, 64, 48)
                + key(1, 0x61) + key(0, 0x61) + pointer(1, 3, 3) + cut_text(b"x")
                + ext_clip(CLIP_NOTIFY | CLIP_TEXT) + struct.pack(">BBH", 255, 1, 0)
                + update_request(1, 0, 0, 64, 48))
put("rfb_session", "none-3.8", b"\x00RFB 003.008\n\x01\x01" + session_tail)
put("rfb_session", "none-3.3", b"\x00RFB 003.003\n\x01" + session_tail)
put("rfb_session", "vnc-auth", b"\x01RFB 003.008\n\x02" + bytes(range(16)) + b"\x01" + session_tail)
put("rfb_session", "vnc-bad-version", b"\x01RFB 004.001\n\x02")
# VeNCrypt 0.2, subtype X509Vnc (261) / X509Plain (262): then a TLS ClientHello follows.
client_hello = bytes.fromhex(
    "16030100a5010000a10303" + "11" * 32 + "00" + "0004130113020100" + "0074"
    "0000000e000c0000096c6f63616c686f7374"  # server_name localhost
    "000a00040002001d"                      # groups x25519
    "000d000400020403"                      # signature ecdsa_secp256r1_sha256
    "002b0003020304"                        # supported_versions TLS 1.3
    "0033002600240" + "01d0020" + "22" * 32 +  # key_share x25519
    "002d00020101" + "0010000e000c02683208687474702f312e31")
put("rfb_session", "vencrypt-x509vnc", b"\x02RFB 003.008\n\x13\x00\x02" + struct.pack(">I", 261) + client_hello)
put("rfb_session", "vencrypt-x509plain", b"\x03RFB 003.008\n\x13\x00\x02" + struct.pack(">I", 262) + client_hello)
put("rfb_session", "vencrypt-plain-refused", b"\x03RFB 003.008\n\x13\x00\x02" + struct.pack(">I", 256)
    + struct.pack(">II", 4, 8) + b"userfuzzpass")

# ---- the browser listener -------------------------------------------------------------------
def ws_frame(payload, opcode=2, fin=True, mask=b"\x01\x02\x03\x04"):
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


upgrade = (b"GET /websockify HTTP/1.1\r\nHost: 127.0.0.1:6080\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n"
           b"Origin: http://127.0.0.1:6080\r\n\r\n")
put("web_http", "index", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
put("web_http", "app-js-keepalive", b"GET /app.js HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
put("web_http", "readyz-head", b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
put("web_http", "novnc-asset", b"GET /novnc/core/rfb.js HTTP/1.1\r\nHost: x\r\n\r\n")
put("web_http", "post", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nabcd")
put("web_http", "chunked", b"POST /websockify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n")
put("web_http", "ws-rfb", upgrade + ws_frame(b"RFB 003.008\n") + ws_frame(b"\x01") + ws_frame(b"\x01")
    + ws_frame(session_tail))
put("web_http", "ws-fragmented", upgrade + ws_frame(b"RFB 00", fin=False) + ws_frame(b"3.008\n", opcode=0)
    + ws_frame(b"ping", opcode=9) + ws_frame(b"\x01\x01", opcode=2))
put("web_http", "ws-close", upgrade + ws_frame(struct.pack(">H", 1000) + b"bye", opcode=8))
put("web_http", "ws-text", upgrade + ws_frame(b"RFB 003.008\n", opcode=1))
put("web_http", "ws-big", upgrade + ws_frame(bytes(70000)))
put("web_http", "ws-bad-version", upgrade.replace(b"Version: 13", b"Version: 8"))

# ---- RDP before and beside ironrdp ------------------------------------------------------------
def tpkt(payload):
    return struct.pack(">BxH", 3, len(payload) + 4) + payload


x224_cr = tpkt(bytes([6 + 23 + 8, 0xE0, 0, 0, 0, 0, 0]) + b"Cookie: mstshash=user\r\n"
               + struct.pack("<BBHI", 1, 0, 8, 0x0B))
x224_data = lambda p: tpkt(b"\x02\xf0\x80" + p)
erect_domain = x224_data(b"\x04\x01\x00\x01\x00")
attach_user = x224_data(b"\x28")
channel_join = x224_data(b"\x38\x00\x07\x03\xeb")
ts_request = bytes.fromhex("3037a003020106a130302e302ca02a04284e544c4d5353500001000000b78208e2"
                           "000000000000000000000000000000000a00614a0000000f")
ts_error = bytes.fromhex("300ba003020106a4040202c000006d")


def fast_path(events):
    body = b"".join(events)
    n = len(events)
    length = 2 + len(body)
    if length + 1 > 0x7f:
        return bytes([n << 2]) + struct.pack(">H", 0x8000 | (length + 1)) + body
    return bytes([n << 2, length]) + body


kbd = lambda flags, code: bytes([(0 << 5) | flags, code])
mouse = lambda flags, x, y: bytes([1 << 5]) + struct.pack("<HHH", flags, x, y)
mousex = lambda flags, x, y: bytes([2 << 5]) + struct.pack("<HHH", flags, x, y)
sync = lambda flags: bytes([(3 << 5) | flags])
uni = lambda flags, c: bytes([(4 << 5) | flags]) + struct.pack("<H", c)
rel = lambda flags, dx, dy: bytes([5 << 5]) + struct.pack("<Hhh", flags, dx, dy)
fp_events = [
    kbd(0, 0x1E), kbd(1, 0x1E), kbd(2, 0x48), kbd(3, 0x48), kbd(4, 0x1D), kbd(0, 0x45),
    mouse(0x0800, 100, 200), mouse(0x9000, 100, 200), mouse(0x1000, 100, 200), mouse(0x0200 | 0x78, 0, 0),
    mouse(0x0400 | 0x188, 0, 0), mousex(0x8001, 1, 1), mousex(0x0002, 1, 1), sync(0x05), sync(0),
    uni(0, 0x00e9), uni(1, 0x00e9), rel(0x0800, -5, 7), rel(0x9000, 0, 0),
]
put("rdp_inbound", "x224-connection-request", b"\x00" + x224_cr)
put("rdp_inbound", "credssp", b"\x07" + ts_request + ts_error)
put("rdp_inbound", "mcs", b"\x03" + x224_cr + erect_domain + attach_user + channel_join)
put("rdp_inbound", "fast-path-each", b"\x00" + b"".join(fast_path([e]) for e in fp_events))
put("rdp_inbound", "fast-path-many", b"\x05" + tpkt(b"\x02\xf0\x80") + fast_path(fp_events))
put("rdp_inbound", "fast-path-count-byte", b"\x01" + bytes([0]) + bytes([2 + 1 + 2 + 1]) + b"\x01" + kbd(0, 0x1C))
put("rdp_inbound", "clipboard-utf16", b"\x00" + "pasted é\r\n".encode("utf-16-le") + b"\x00\x00")

# ---- domains, hook calls, HTTP/2 --------------------------------------------------------------
domains_dir = os.path.join(ROOT, "..", "tests", "data", "domains")
domains = {}
for name in sorted(os.listdir(domains_dir)):
    with open(os.path.join(domains_dir, name), "rb") as f:
        domains[name] = f.read()
for knobs in (0x0F, 0x3F, 0x0B):
    for name, xml in domains.items():
        put("domain_rewrite", f"{knobs:02x}-{name}", bytes([knobs]) + xml)


def pb_field(no, data):
    out = bytes([(no << 3) | 2])
    n = len(data)
    while True:
        b = n & 0x7F
        n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out + data


vmi = json.dumps({
    "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
    "metadata": {"name": "vm-desktop", "namespace": "default", "annotations": {
        "hooks.kubevirt.io/hookSidecars": "[{\"image\": \"vdi-sidecar\"}]",
        "vdi.kubevirt.io/video": "virtio", "vdi.kubevirt.io/audio": "true",
        "vdi.kubevirt.io/drop-vnc": "false"}},
    "spec": {"domain": {"devices": {"sound": {"name": "audio"}}}},
    "status": {"launcherContainerImageVersion": "v1.8.4"}}).encode()
basic = domains["kubevirt-basic.xml"]
define = pb_field(1, basic) + pb_field(2, vmi)
put("hook_calls", "v1alpha1-define", b"\x00" + define)
put("hook_calls", "v1alpha2-define", b"\x01" + define)
put("hook_calls", "v1alpha3-define", b"\x02" + define)
put("hook_calls", "v1alpha2-cloudinit", b"\x03" + pb_field(1, b"{}") + pb_field(2, vmi) + pb_field(3, b"{}"))
put("hook_calls", "v1alpha3-cloudinit", b"\x04" + pb_field(2, vmi) + pb_field(3, b'{"userData":"x"}'))
put("hook_calls", "mutate-boot", b"\x05" + pb_field(1, b"libvirt") + pb_field(2, domains["libvirtxml-marshalled.xml"])
    + pb_field(3, vmi) + pb_field(4, pb_field(1, b"Boot")))
put("hook_calls", "mutate-migration", b"\x05" + pb_field(1, b"libvirt") + pb_field(2, basic)
    + pb_field(3, vmi) + pb_field(4, pb_field(1, b"MigrationTarget")))
put("hook_calls", "vmi-json", b"\x06" + vmi)
put("hook_calls", "vmi-bad-annotation", b"\x06" + vmi.replace(b'"false"', b'"maybe"'))


def h2_frame(ty, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([ty, flags]) + struct.pack(">I", stream) + payload


def hpack_literal(name, value):
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
settings = h2_frame(4, 0, 0, struct.pack(">HI", 2, 0) + struct.pack(">HI", 4, 4194304))
headers = (b"\x83\x86" + hpack_literal(b":path", b"/kubevirt.hooks.info.Info/Info")
           + hpack_literal(b":authority", b"/var/run/kubevirt-hooks/vdi-sidecar.sock")
           + hpack_literal(b"content-type", b"application/grpc") + hpack_literal(b"te", b"trailers"))
data = h2_frame(0, 1, 1, b"\x00\x00\x00\x00\x00")
put("hook_http2", "info-call", b"\x07" + preface + settings + h2_frame(1, 4, 1, headers) + data)
put("hook_http2", "continuation", b"\x02" + preface + settings + h2_frame(1, 0, 1, headers[:20])
    + h2_frame(9, 4, 1, headers[20:]) + data)
put("hook_http2", "padded-priority", b"\x30" + preface + h2_frame(1, 0x2C, 3, b"\x02" + b"\x00\x00\x00\x01\x10"
    + headers + b"\x00\x00") + h2_frame(8, 0, 0, b"\x00\x00\x10\x00"))
put("hook_http2", "indexed-authority", b"\x00" + preface + h2_frame(1, 5, 1, b"\x83\x86\x01" + bytes([4]) + b"x.io"))

# ---- QEMU listener calls ----------------------------------------------------------------------
def dbus_call(member, signature, body, path=b"/org/qemu/Display1/Listener",
              iface=b"org.qemu.Display1.Listener", flags=1, serial=7):
    fields = b""

    def pad(b, n):
        return b + bytes((-len(b)) % n)

    def field(code, sig, value):
        nonlocal fields
        fields = pad(fields, 8)
        f = bytes([code, 1]) + sig + b"\x00"
        if sig in (b"o", b"s"):
            f = pad(f, 4) + struct.pack("<I", len(value)) + value + b"\x00"
        elif sig == b"g":
            f += bytes([len(value)]) + value + b"\x00"
        fields += f

    field(1, b"o", path)
    field(2, b"s", iface)
    field(3, b"s", member)
    field(8, b"g", signature)
    head = struct.pack("<cBBBIII", b"l", 1, flags, 1, len(body), serial, len(fields)) + fields
    return pad(head, 8) + body


px = bytes(range(256)) * 2
scanout = dbus_call(b"Scanout", b"uuuuay", struct.pack("<IIIII", 8, 4, 32, 0x20020888, 128) + px[:128])
update = dbus_call(b"Update", b"iiiiuuay", struct.pack("<iiiiIII", 2, 1, 3, 2, 12, 0x20020888, 24) + px[:24])
put("qemu_frames", "scanout", scanout)
put("qemu_frames", "update", update)
put("qemu_frames", "update-beyond", dbus_call(b"Update", b"iiiiuuay",
    struct.pack("<iiiiIII", 30, 20, 2, 2, 8, 0x20020888, 16) + px[:16]))
put("qemu_frames", "scanout-rgb565", dbus_call(b"Scanout", b"uuuuay",
    struct.pack("<IIIII", 4, 4, 8, 0x10020565, 32) + px[:32]))
put("qemu_frames", "big-endian", scanout.replace(b"l", b"B", 1))
put("qemu_frames", "fields", struct.pack("<10I", 16, 8, 64, 0, 0x20020888, 1, 1, 2, 2, 0x0404) + px)

# ---- audio formats ----------------------------------------------------------------------------
def audio_head(bits, flags, freq, channels, sample, cchannels, cfreq, vol):
    return (bytes([bits, flags]) + struct.pack("<I", freq)[:3] + bytes([channels, sample, cchannels])
            + struct.pack("<I", cfreq)[:3] + bytes([vol]) + b"\xc8\x64\xff\x00")


pcm = struct.pack("<32h", *[(i * 977) % 30000 - 15000 for i in range(32)])
waveformat = struct.pack("<HHIIHHH", 1, 2, 44100, 176400, 4, 16, 0)
formats = bytes([0x02]) + struct.pack("<II", 1, 4 + 18) + waveformat
msgs = [bytes([0x01]) + struct.pack("<I", 1), formats, bytes([0x04]) + struct.pack("<I", 0),
        bytes([0x05]), bytes([0x06]) + pcm[:40], bytes([0x07]) + struct.pack("<I", 0)]
mic = b"".join(bytes([len(m)]) + m for m in msgs)
put("audio_formats", "s16-48k-to-s16-44k", audio_head(16, 1, 48000, 2, 3, 2, 44100, 0x80) + pcm + mic)
put("audio_formats", "f32-to-u8", audio_head(32, 3, 44100, 2, 0, 1, 8000, 0x41) + pcm)
put("audio_formats", "s32-mono", audio_head(32, 1, 22050, 1, 5, 2, 48000, 0) + pcm)
put("audio_formats", "mic", audio_head(8, 0, 8000, 1, 1, 1, 8000, 0) + mic)
print("seeds written to", SEEDS)
