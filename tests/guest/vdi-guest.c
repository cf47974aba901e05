/*
 * vdi-guest: the test guest's only program. It runs as PID 1's child in a tiny initramfs
 * (busybox + this), takes commands on the serial console, draws known pixels, animates,
 * reports every input event it receives, and answers with lines starting "VDI ".
 *
 * Displays:
 *   vbe  - QEMU's std VGA, driven directly: Bochs VBE "dispi" registers in the MMIO BAR (2) set
 *          any mode (this is how the tests switch resolution), pixels go to the VRAM BAR (0).
 *   fb   - /dev/fb0 (e.g. virtio-gpu's DRM fbdev emulation: the shared-memory Map path).
 *
 * Commands (one per line):
 *   display vbe|fb           choose the display (vbe: also sets a mode, see "mode")
 *   mode W H                 vbe: switch to W x H x 32
 *   fill SEED                draw the test image (gradients, bars, noise) from SEED
 *   solid RRGGBB             fill the screen with one colour
 *   rect X Y W H RRGGBB      fill a rectangle
 *   scroll N                 move the screen up N rows, paint the N new bottom rows
 *   animate N                draw N full-screen frames as fast as possible
 *   scene NAME MS            a benchmark scene for MS milliseconds, then "OK scene NAME N frames":
 *                              video    full-screen animation, every pixel changes, flat out
 *                              scroll   the screen scrolls up 8 rows per frame, 60 frames a second
 *                              desktop  text typed into a white window, 60 glyphs a second
 *   keybox on|off            on a key press, fill the top-left 64x64 box with a colour
 *                            derived from the key code (default on)
 *   info                     print the current mode
 *   drmmode                  print the preferred mode of the first DRM connector
 *   tone HZ MS [RATE]        play a sine of HZ for MS milliseconds on /dev/snd/pcmC0D0p
 *                            (S16_LE stereo at RATE, default 48000)
 *   record MS [RATE]         record MS milliseconds from /dev/snd/pcmC0D0c and print its
 *                            dominant frequency (zero crossings) and RMS level
 *   copy TEXT                the guest copies TEXT (escapes: \n \t \\) to its clipboard
 *   copygen N                the guest copies a generated N-byte text ("OK copy N <fnv1a>")
 *   paste                    the guest pastes: "VDI PASTE <len> <fnv1a> <text, escaped>", or
 *                            "VDI PASTE-TIMEOUT" when no text came within 8 s
 *   release                  the guest's clipboard goes empty
 * Input events from every /dev/input/event* are printed as
 *   "VDI EV <dev> <type> <code> <value>".
 *
 * Clipboard agent: a minimal spice vdagent on the virtio-serial port "com.redhat.spice.0"
 * (QEMU's qemu-vdagent chardev): it announces clipboard-by-demand, selections and grab
 * serials, and speaks grab / request / data / release. Host grabs and releases are printed as
 * "VDI CLIP GRAB <serial>" and "VDI CLIP RELEASE". When QEMU resets the agent (it closes the
 * port to reset serials), the port is opened again and the capabilities announced again.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fb.h>
#include <linux/input.h>
#include <linux/kd.h>
#include <math.h>
#include <sound/asound.h>
#include <spice/vd_agent.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_INPUTS 16

static struct {
    int kind; /* 0 none, 1 vbe, 2 fb */
    uint8_t *pixels;
    size_t map_len;
    uint32_t width, height, stride, bpp;
    uint32_t roff, goff, boff; /* bit offsets for fb */
    volatile uint16_t *dispi;  /* vbe registers */
    size_t vram_len;
    int fb_fd;
} d;

static int keybox = 1;

static const char *drm_preferred_mode(void);
static void agent_command(const char *op, char *line);

static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("VDI ");
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
    va_end(ap);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

static inline void put(uint32_t x, uint32_t y, uint32_t rgb) {
    uint8_t *p = d.pixels + (size_t)y * d.stride + (size_t)x * (d.bpp / 8);
    uint32_t r = (rgb >> 16) & 0xff, g = (rgb >> 8) & 0xff, b = rgb & 0xff;
    if (d.bpp == 32) {
        uint32_t v = (r << d.roff) | (g << d.goff) | (b << d.boff);
        memcpy(p, &v, 4);
    } else if (d.bpp == 24) {
        p[d.boff / 8] = b; p[d.goff / 8] = g; p[d.roff / 8] = r;
    } else if (d.bpp == 16) {
        uint16_t v = ((r >> 3) << 11) | ((g >> 2) << 5) | (b >> 3);
        memcpy(p, &v, 2);
    }
}

static void flush(void) {
    if (d.kind == 2) {
        /* DRM fbdev emulation with deferred I/O flushes on its own; a pan makes it prompt. */
        struct fb_var_screeninfo v;
        if (ioctl(d.fb_fd, FBIOGET_VSCREENINFO, &v) == 0)
            ioctl(d.fb_fd, FBIOPAN_DISPLAY, &v);
        msync(d.pixels, d.map_len, MS_SYNC);
    }
}

/* Bochs VBE dispi register indexes (QEMU hw/display/vga_int.h). */
enum { DISPI_ID, DISPI_XRES, DISPI_YRES, DISPI_BPP, DISPI_ENABLE, DISPI_BANK, DISPI_VIRT_W,
       DISPI_VIRT_H, DISPI_X_OFF, DISPI_Y_OFF };

static int find_stdvga(char *path, size_t len) {
    DIR *dir = opendir("/sys/bus/pci/devices");
    struct dirent *e;
    if (!dir) return -1;
    while ((e = readdir(dir))) {
        char p[512], buf[32];
        FILE *f;
        unsigned ven = 0, dev = 0;
        if (e->d_name[0] == '.') continue;
        snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/vendor", e->d_name);
        if (!(f = fopen(p, "r"))) continue;
        if (fgets(buf, sizeof buf, f)) ven = strtoul(buf, 0, 16);
        fclose(f);
        snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/device", e->d_name);
        if (!(f = fopen(p, "r"))) continue;
        if (fgets(buf, sizeof buf, f)) dev = strtoul(buf, 0, 16);
        fclose(f);
        if (ven == 0x1234 && dev == 0x1111) {
            snprintf(path, len, "/sys/bus/pci/devices/%s", e->d_name);
            closedir(dir);
            return 0;
        }
    }
    closedir(dir);
    return -1;
}

static void *map_resource(const char *dev, int bar, size_t *len) {
    char p[600];
    struct stat st;
    int fd;
    void *m;
    snprintf(p, sizeof p, "%s/resource%d", dev, bar);
    if ((fd = open(p, O_RDWR | O_SYNC)) < 0) return NULL;
    if (fstat(fd, &st) < 0) { close(fd); return NULL; }
    *len = st.st_size;
    m = mmap(NULL, *len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return m == MAP_FAILED ? NULL : m;
}

static int open_vbe(void) {
    char dev[512];
    size_t mmio_len;
    void *mmio;
    if (find_stdvga(dev, sizeof dev) < 0) { say("ERR no std VGA (1234:1111)"); return -1; }
    d.pixels = map_resource(dev, 0, &d.vram_len);
    mmio = map_resource(dev, 2, &mmio_len);
    if (!d.pixels || !mmio || mmio_len < 0x600) { say("ERR cannot map std VGA BARs"); return -1; }
    d.dispi = (volatile uint16_t *)((uint8_t *)mmio + 0x500);
    d.kind = 1;
    d.map_len = d.vram_len;
    return 0;
}

static int set_mode(uint32_t w, uint32_t h) {
    if (d.kind != 1) { say("ERR mode needs display vbe"); return -1; }
    if (w < 64 || h < 64 || w > 4096 || h > 4096 || (size_t)w * h * 4 > d.vram_len) {
        say("ERR mode %ux%u does not fit", w, h);
        return -1;
    }
    d.dispi[DISPI_ENABLE] = 0;
    d.dispi[DISPI_BPP] = 32;
    d.dispi[DISPI_XRES] = w;
    d.dispi[DISPI_YRES] = h;
    d.dispi[DISPI_VIRT_W] = w;
    d.dispi[DISPI_VIRT_H] = h;
    d.dispi[DISPI_X_OFF] = 0;
    d.dispi[DISPI_Y_OFF] = 0;
    d.dispi[DISPI_BANK] = 0;
    d.dispi[DISPI_ENABLE] = 0x01 | 0x40; /* enabled | linear frame buffer */
    d.width = w; d.height = h; d.bpp = 32; d.stride = w * 4;
    d.roff = 16; d.goff = 8; d.boff = 0;
    return 0;
}

static int open_fb(void) {
    struct fb_var_screeninfo v;
    struct fb_fix_screeninfo f;
    d.fb_fd = open("/dev/fb0", O_RDWR);
    if (d.fb_fd < 0) { say("ERR no /dev/fb0: %s", strerror(errno)); return -1; }
    if (ioctl(d.fb_fd, FBIOGET_VSCREENINFO, &v) < 0 || ioctl(d.fb_fd, FBIOGET_FSCREENINFO, &f) < 0) {
        say("ERR fb ioctl: %s", strerror(errno));
        return -1;
    }
    d.width = v.xres; d.height = v.yres; d.bpp = v.bits_per_pixel; d.stride = f.line_length;
    d.roff = v.red.offset; d.goff = v.green.offset; d.boff = v.blue.offset;
    d.map_len = f.smem_len;
    d.pixels = mmap(NULL, d.map_len, PROT_READ | PROT_WRITE, MAP_SHARED, d.fb_fd, 0);
    if (d.pixels == MAP_FAILED) { say("ERR fb mmap: %s", strerror(errno)); return -1; }
    d.kind = 2;
    /* The console must not draw on our pixels (fbcon's blinking cursor would be a stream of
     * updates): graphics mode on the active VT, and no blink in any case. */
    int tty = open("/dev/tty0", O_RDWR);
    if (tty >= 0) {
        ioctl(tty, KDSETMODE, KD_GRAPHICS);
        close(tty);
    }
    int blink = open("/sys/class/graphics/fbcon/cursor_blink", O_WRONLY);
    if (blink >= 0) {
        if (write(blink, "0", 1) < 0) { /* nothing to do */ }
        close(blink);
    }
    return 0;
}

static uint32_t hash(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16;
    return x;
}

/* The test image: horizontal/vertical gradients, eight colour bars, a noise band and a border,
 * so that channel order, stride and offsets errors all show. */
static void fill(uint32_t seed) {
    for (uint32_t y = 0; y < d.height; y++) {
        for (uint32_t x = 0; x < d.width; x++) {
            uint32_t c;
            if (x == 0 || y == 0 || x == d.width - 1 || y == d.height - 1) c = 0xff00ff;
            else if (y < d.height / 4) c = ((x * 255 / d.width) << 16) | ((y * 255 / (d.height / 4)) << 8) | (seed & 0xff);
            else if (y < d.height / 2) {
                static const uint32_t bars[8] = {0xffffff, 0xffff00, 0x00ffff, 0x00ff00,
                                                 0xff00ff, 0xff0000, 0x0000ff, 0x000000};
                c = bars[(x * 8 / d.width + seed) % 8];
            } else if (y < d.height * 3 / 4) c = hash(x * 7919 + y * 104729 + seed) & 0xffffff;
            else c = (((x + y + seed) & 0xff) << 16) | (((x ^ y) & 0xff) << 8) | ((x * y) & 0xff);
            put(x, y, c);
        }
    }
    flush();
}

static void rect(uint32_t x0, uint32_t y0, uint32_t w, uint32_t h, uint32_t rgb) {
    for (uint32_t y = y0; y < y0 + h && y < d.height; y++)
        for (uint32_t x = x0; x < x0 + w && x < d.width; x++) put(x, y, rgb);
    flush();
}

/* Scrolls the screen up by n rows (as a console does) and paints the new bottom rows. */
static void scroll(uint32_t n) {
    if (n >= d.height) n = d.height - 1;
    memmove(d.pixels, d.pixels + (size_t)n * d.stride, (size_t)(d.height - n) * d.stride);
    for (uint32_t y = d.height - n; y < d.height; y++)
        for (uint32_t x = 0; x < d.width; x++) put(x, y, hash(x * 31 + y * 7 + n) & 0xffffff);
    flush();
}

/* The scroll scene's step: like scroll(), but the new rows are text-like lines (dark glyph pixels
 * on white, 12 of every 16 rows) that differ from step to step, as in a scrolling document. */
static void scroll_text(uint32_t n) {
    static uint32_t line;
    if (n >= d.height) n = d.height - 1;
    memmove(d.pixels, d.pixels + (size_t)n * d.stride, (size_t)(d.height - n) * d.stride);
    for (uint32_t y = d.height - n; y < d.height; y++, line++)
        for (uint32_t x = 0; x < d.width; x++)
            put(x, y, line % 16 < 12 && (hash(x / 2 + (line / 16) * 7919 + (line % 16) * 131) & 3) == 0
                          ? 0x202020 : 0xf8f8f8);
    flush();
}

static void video_frame(unsigned i);

static void animate(unsigned n) {
    double t0 = now_ms();
    for (unsigned i = 0; i < n; i++) {
        video_frame(i);
        if ((i + 1) % 10 == 0) say("FRAME %u", i + 1);
    }
    say("OK animate %u frames %.0f ms", n, now_ms() - t0);
}

static void video_frame(unsigned i) {
    for (uint32_t y = 0; y < d.height; y++)
        for (uint32_t x = 0; x < d.width; x++)
            put(x, y, (((x + i * 8) & 0xff) << 16) | (((y + i * 4) & 0xff) << 8) | (i & 0xff));
    flush();
}

/* One 8x16 "glyph" (a hashed two-colour pattern, like anti-aliasing-free text) at the cursor of
 * a typing scene inside the window (wx, wy, ww, wh). */
static void glyph(unsigned i, uint32_t wx, uint32_t wy, uint32_t ww, uint32_t wh) {
    uint32_t cols = ww / 8, rows = wh / 16;
    uint32_t cx = wx + (i % cols) * 8, cy = wy + ((i / cols) % rows) * 16;
    if (i % cols == 0 && (i / cols) % rows == 0) rect(wx, wy, ww, wh, 0xf8f8f8);
    for (uint32_t y = 0; y < 16; y++)
        for (uint32_t x = 0; x < 8; x++)
            put(cx + x, cy + y, (hash(i * 977 + y * 8 + x) & 3) == 0 ? 0x202020 : 0xf8f8f8);
    flush();
}

static void scene(const char *name, unsigned ms) {
    double t0 = now_ms();
    unsigned i = 0;
    int kind = !strcmp(name, "video") ? 1 : !strcmp(name, "scroll") ? 2 : !strcmp(name, "desktop") ? 3 : 0;
    if (!kind) { say("ERR unknown scene %s", name); return; }
    while (now_ms() - t0 < ms) {
        if (kind == 1) video_frame(i);
        else if (kind == 2) {
            scroll_text(8);
            usleep(16667);
        } else {
            glyph(i, d.width / 8, d.height / 8, d.width * 3 / 4 / 8 * 8, d.height * 3 / 4 / 16 * 16);
            usleep(16667);
        }
        i++;
    }
    say("OK scene %s %u frames %.0f ms", name, i, now_ms() - t0);
}

/* ALSA PCM through the kernel's ioctl interface (no alsa-lib in the initramfs). */
static void mask_only(struct snd_pcm_hw_params *p, int param, unsigned val) {
    struct snd_mask *m = &p->masks[param - SNDRV_PCM_HW_PARAM_FIRST_MASK];
    memset(m, 0, sizeof *m);
    m->bits[val >> 5] |= 1u << (val & 31);
}

static void interval_is(struct snd_pcm_hw_params *p, int param, unsigned val) {
    struct snd_interval *i = &p->intervals[param - SNDRV_PCM_HW_PARAM_FIRST_INTERVAL];
    i->min = i->max = val;
    i->integer = 1;
}

/* Drivers start with their mixer muted (userspace normally restores it): switch every switch
 * on and every volume to its maximum, through /dev/snd/controlC0. */
static void mixer_unmute(void) {
    struct snd_ctl_elem_list list;
    struct snd_ctl_elem_id *ids;
    int fd = open("/dev/snd/controlC0", O_RDWR);
    if (fd < 0) return;
    memset(&list, 0, sizeof list);
    if (ioctl(fd, SNDRV_CTL_IOCTL_ELEM_LIST, &list) < 0 || !list.count) { close(fd); return; }
    ids = calloc(list.count, sizeof *ids);
    list.space = list.count;
    list.pids = ids;
    if (ids && ioctl(fd, SNDRV_CTL_IOCTL_ELEM_LIST, &list) == 0) {
        for (unsigned n = 0; n < list.used; n++) {
            struct snd_ctl_elem_info info;
            struct snd_ctl_elem_value val;
            memset(&info, 0, sizeof info);
            info.id = ids[n];
            if (ioctl(fd, SNDRV_CTL_IOCTL_ELEM_INFO, &info) < 0) continue;
            if (!(info.access & SNDRV_CTL_ELEM_ACCESS_WRITE)) continue;
            memset(&val, 0, sizeof val);
            val.id = ids[n];
            for (unsigned c = 0; c < info.count && c < 128; c++) {
                if (info.type == SNDRV_CTL_ELEM_TYPE_BOOLEAN) val.value.integer.value[c] = 1;
                else if (info.type == SNDRV_CTL_ELEM_TYPE_INTEGER) val.value.integer.value[c] = info.value.integer.max;
                else goto next;
            }
            ioctl(fd, SNDRV_CTL_IOCTL_ELEM_WRITE, &val);
        next:;
        }
    }
    free(ids);
    close(fd);
}

static int pcm_open(int capture, unsigned rate) {
    char path[64];
    struct snd_pcm_hw_params p;
    int fd;
    snprintf(path, sizeof path, "/dev/snd/pcmC0D0%c", capture ? 'c' : 'p');
    /* HDA codecs are probed asynchronously; under emulation that takes a few seconds. */
    for (int tries = 0; (fd = open(path, O_RDWR)) < 0 && tries < 100; tries++) usleep(100000);
    if (fd < 0) { say("ERR %s: %s", path, strerror(errno)); return -1; }
    mixer_unmute();
    memset(&p, 0, sizeof p);
    for (int i = 0; i <= SNDRV_PCM_HW_PARAM_LAST_MASK - SNDRV_PCM_HW_PARAM_FIRST_MASK; i++)
        memset(&p.masks[i], 0xff, sizeof p.masks[i]);
    for (int i = 0; i <= SNDRV_PCM_HW_PARAM_LAST_INTERVAL - SNDRV_PCM_HW_PARAM_FIRST_INTERVAL; i++) {
        p.intervals[i].min = 0;
        p.intervals[i].max = ~0u;
    }
    p.rmask = ~0u;
    p.info = ~0u;
    mask_only(&p, SNDRV_PCM_HW_PARAM_ACCESS, SNDRV_PCM_ACCESS_RW_INTERLEAVED);
    mask_only(&p, SNDRV_PCM_HW_PARAM_FORMAT, SNDRV_PCM_FORMAT_S16_LE);
    mask_only(&p, SNDRV_PCM_HW_PARAM_SUBFORMAT, SNDRV_PCM_SUBFORMAT_STD);
    interval_is(&p, SNDRV_PCM_HW_PARAM_CHANNELS, 2);
    interval_is(&p, SNDRV_PCM_HW_PARAM_RATE, rate);
    interval_is(&p, SNDRV_PCM_HW_PARAM_SAMPLE_BITS, 16);
    interval_is(&p, SNDRV_PCM_HW_PARAM_FRAME_BITS, 32);
    if (ioctl(fd, SNDRV_PCM_IOCTL_HW_PARAMS, &p) < 0) {
        say("ERR hw_params %u Hz: %s", rate, strerror(errno));
        close(fd);
        return -1;
    }
    if (ioctl(fd, SNDRV_PCM_IOCTL_PREPARE) < 0) { say("ERR prepare: %s", strerror(errno)); close(fd); return -1; }
    return fd;
}

static void tone(unsigned hz, unsigned ms, unsigned rate) {
    int fd = pcm_open(0, rate);
    int16_t buf[2 * 480];
    unsigned long total = (unsigned long)rate * ms / 1000, done = 0;
    double t0 = now_ms();
    if (fd < 0) return;
    while (done < total) {
        unsigned n = total - done < 480 ? total - done : 480;
        struct snd_xferi x;
        for (unsigned i = 0; i < n; i++) {
            int16_t v = (int16_t)(12000 * sin(2 * M_PI * hz * (double)(done + i) / rate));
            buf[2 * i] = buf[2 * i + 1] = v;
        }
        x.result = 0; x.buf = buf; x.frames = n;
        if (ioctl(fd, SNDRV_PCM_IOCTL_WRITEI_FRAMES, &x) < 0) {
            if (errno == EPIPE) { ioctl(fd, SNDRV_PCM_IOCTL_PREPARE); continue; }
            say("ERR write: %s", strerror(errno));
            break;
        }
        done += x.result;
    }
    ioctl(fd, SNDRV_PCM_IOCTL_DRAIN);
    close(fd);
    say("OK tone %u Hz %u ms %.0f ms", hz, ms, now_ms() - t0);
}

static void record(unsigned ms, unsigned rate) {
    int fd = pcm_open(1, rate);
    int16_t buf[2 * 480];
    unsigned long total = (unsigned long)rate * ms / 1000, done = 0, crossings = 0;
    long first = -1, last = -1; /* frames where sound starts and ends: the pitch is over those */
    double sum2 = 0;
    int prev = 0;
    if (fd < 0) return;
    ioctl(fd, SNDRV_PCM_IOCTL_START);
    while (done < total) {
        struct snd_xferi x;
        x.result = 0; x.buf = buf; x.frames = 480;
        if (ioctl(fd, SNDRV_PCM_IOCTL_READI_FRAMES, &x) < 0) {
            if (errno == EPIPE) { ioctl(fd, SNDRV_PCM_IOCTL_PREPARE); ioctl(fd, SNDRV_PCM_IOCTL_START); continue; }
            say("ERR read: %s", strerror(errno));
            break;
        }
        for (long i = 0; i < x.result; i++) {
            int v = buf[2 * i];
            int sign = v > 200 ? 1 : v < -200 ? -1 : 0; /* hysteresis against noise */
            if (sign && prev && sign != prev) crossings++;
            if (sign) prev = sign;
            if (sign) { if (first < 0) first = (long)(done + i); last = (long)(done + i); }
            sum2 += (double)v * v;
        }
        done += x.result;
    }
    close(fd);
    say("OK record %lu frames freq %.1f rms %.0f sound %ld ms", done,
        last > first ? crossings / 2.0 * rate / (double)(last - first) : 0.0,
        done ? sqrt(sum2 / done) : 0.0, last > first ? (last - first) * 1000L / (long)rate : 0L);
}

static int inputs[MAX_INPUTS];
static char input_names[MAX_INPUTS][32];
static int ninputs;

static void open_inputs(void) {
    DIR *dir = opendir("/dev/input");
    struct dirent *e;
    if (!dir) return;
    while ((e = readdir(dir)) && ninputs < MAX_INPUTS) {
        char p[300];
        int fd;
        if (strncmp(e->d_name, "event", 5) != 0) continue;
        snprintf(p, sizeof p, "/dev/input/%s", e->d_name);
        if ((fd = open(p, O_RDONLY | O_NONBLOCK)) < 0) continue;
        inputs[ninputs] = fd;
        ioctl(fd, EVIOCGNAME(sizeof input_names[0]), input_names[ninputs]);
        say("INPUT %s %s", e->d_name, input_names[ninputs]);
        ninputs++;
    }
    closedir(dir);
}

static void command(char *line) {
    char op[32] = {0}, arg[32] = {0};
    unsigned a, b, c, e, rgb;
    if (sscanf(line, "%31s", op) != 1) return;
    if (!strcmp(op, "copy") || !strcmp(op, "copygen") || !strcmp(op, "paste") || !strcmp(op, "release")) {
        agent_command(op, line);
    } else if (!strcmp(op, "display") && sscanf(line, "%*s %31s", arg) == 1) {
        int r = !strcmp(arg, "vbe") ? open_vbe() : !strcmp(arg, "fb") ? open_fb() : -1;
        if (r == 0) say("OK display %s %ux%u", arg, d.width, d.height);
    } else if (!strcmp(op, "mode") && sscanf(line, "%*s %u %u", &a, &b) == 2) {
        if (set_mode(a, b) == 0) say("OK mode %u %u", a, b);
    } else if (!strcmp(op, "tone") && sscanf(line, "%*s %u %u", &a, &b) == 2) {
        if (sscanf(line, "%*s %*u %*u %u", &c) != 1) c = 48000;
        tone(a, b, c);
    } else if (!strcmp(op, "record") && sscanf(line, "%*s %u", &a) == 1) {
        if (sscanf(line, "%*s %*u %u", &c) != 1) c = 48000;
        record(a, c);
    } else if (!d.kind) {
        say("ERR no display");
    } else if (!strcmp(op, "fill") && sscanf(line, "%*s %u", &a) == 1) {
        fill(a);
        say("OK fill %u", a);
    } else if (!strcmp(op, "solid") && sscanf(line, "%*s %x", &rgb) == 1) {
        rect(0, 0, d.width, d.height, rgb);
        say("OK solid %06x", rgb);
    } else if (!strcmp(op, "rect") && sscanf(line, "%*s %u %u %u %u %x", &a, &b, &c, &e, &rgb) == 5) {
        rect(a, b, c, e, rgb);
        say("OK rect");
    } else if (!strcmp(op, "scroll") && sscanf(line, "%*s %u", &a) == 1) {
        scroll(a);
        say("OK scroll %u", a);
    } else if (!strcmp(op, "animate") && sscanf(line, "%*s %u", &a) == 1) {
        animate(a);
    } else if (!strcmp(op, "scene") && sscanf(line, "%*s %31s %u", arg, &a) == 2) {
        scene(arg, a);
    } else if (!strcmp(op, "keybox") && sscanf(line, "%*s %31s", arg) == 1) {
        keybox = !strcmp(arg, "on");
        say("OK keybox %d", keybox);
    } else if (!strcmp(op, "info")) {
        say("OK info %ux%u bpp %u stride %u", d.width, d.height, d.bpp, d.stride);
    } else if (!strcmp(op, "drmmode")) {
        say("OK drmmode %s", drm_preferred_mode());
    } else {
        say("ERR unknown command: %s", line);
    }
}

/* The preferred mode of the first connected DRM connector (what a monitor hot-plug, e.g.
 * QEMU's SetUIInfo on virtio-gpu, offers the guest), or "none". */
static const char *drm_preferred_mode(void) {
    static char mode[64];
    strcpy(mode, "none");
    DIR *dir = opendir("/sys/class/drm");
    if (!dir)
        return mode;
    struct dirent *e;
    while ((e = readdir(dir))) {
        if (strncmp(e->d_name, "card", 4) || !strchr(e->d_name, '-'))
            continue;
        char p[300];
        snprintf(p, sizeof p, "/sys/class/drm/%s/modes", e->d_name);
        FILE *f = fopen(p, "r");
        if (!f)
            continue;
        char line[64];
        if (fgets(line, sizeof line, f)) {
            line[strcspn(line, "\n")] = 0;
            snprintf(mode, sizeof mode, "%s", line);
        }
        fclose(f);
        if (strcmp(mode, "none"))
            break;
    }
    closedir(dir);
    return mode;
}

/* ---- clipboard agent ------------------------------------------------------------------ */

#define AGENT_MAX_MSG (4u << 20)
static int vport = -1;
static char vport_path[300];
static uint32_t agent_serial;          /* the next grab serial */
static unsigned char *agent_in;        /* chunk payloads, concatenated */
static size_t agent_used, agent_cap;
static unsigned char *clip_text;       /* what the guest copied */
static size_t clip_len;
static double paste_deadline;          /* 0: no paste waiting */

static uint32_t fnv1a(const unsigned char *p, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 16777619u; }
    return h;
}

static void write_all(int fd, const void *buf, size_t n) {
    const unsigned char *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) { struct pollfd q = { fd, POLLOUT, 0 }; poll(&q, 1, 100); continue; }
        if (w <= 0) return;
        p += w; n -= (size_t)w;
    }
}

/* One agent message, as chunks of at most VD_AGENT_MAX_DATA_SIZE. */
static void agent_send(uint32_t type, const void *head, size_t hlen, const void *data, size_t dlen) {
    if (vport < 0) return;
    size_t total = sizeof(VDAgentMessage) + hlen + dlen;
    unsigned char *m = malloc(total);
    if (!m) return;
    VDAgentMessage msg = { VD_AGENT_PROTOCOL, type, 0, (uint32_t)(hlen + dlen) };
    memcpy(m, &msg, sizeof msg);
    if (hlen) memcpy(m + sizeof msg, head, hlen);
    if (dlen) memcpy(m + sizeof msg + hlen, data, dlen);
    for (size_t off = 0; off < total;) {
        size_t n = total - off < VD_AGENT_MAX_DATA_SIZE ? total - off : VD_AGENT_MAX_DATA_SIZE;
        VDIChunkHeader ch = { VDP_CLIENT_PORT, (uint32_t)n };
        write_all(vport, &ch, sizeof ch);
        write_all(vport, m + off, n);
        off += n;
    }
    free(m);
}

static void agent_caps(int request) {
    uint32_t c[2] = { (uint32_t)request,
                      (1u << VD_AGENT_CAP_CLIPBOARD_BY_DEMAND) | (1u << VD_AGENT_CAP_CLIPBOARD_SELECTION) |
                      (1u << VD_AGENT_CAP_CLIPBOARD_GRAB_SERIAL) };
    agent_send(VD_AGENT_ANNOUNCE_CAPABILITIES, c, sizeof c, NULL, 0);
}

static void agent_open(void) {
    DIR *dir = opendir("/sys/class/virtio-ports");
    struct dirent *e;
    if (vport >= 0) return;
    if (!vport_path[0] && dir) {
        while ((e = readdir(dir))) {
            char p[300], name[64] = {0};
            snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", e->d_name);
            FILE *f = fopen(p, "r");
            if (!f) continue;
            if (fgets(name, sizeof name, f)) name[strcspn(name, "\n")] = 0;
            fclose(f);
            if (!strcmp(name, "com.redhat.spice.0")) snprintf(vport_path, sizeof vport_path, "/dev/%s", e->d_name);
        }
    }
    if (dir) closedir(dir);
    if (!vport_path[0]) return;
    vport = open(vport_path, O_RDWR | O_NONBLOCK);
    if (vport < 0) return;
    agent_used = 0;
    agent_caps(1);
}

static void agent_close(void) {
    if (vport >= 0) close(vport);
    vport = -1;
    agent_used = 0;
}

static void print_paste(const unsigned char *p, size_t n) {
    char *out = malloc(n * 4 + 1), *o = out;
    size_t shown = n < 400 ? n : 400;
    if (!out) return;
    for (size_t i = 0; i < shown; i++) {
        unsigned char ch = p[i];
        if (ch == '\n') { *o++ = '\\'; *o++ = 'n'; }
        else if (ch == '\\') { *o++ = '\\'; *o++ = '\\'; }
        else if (ch < 0x20) o += sprintf(o, "\\x%02x", ch);
        else *o++ = (char)ch;
    }
    *o = 0;
    say("PASTE %zu %08x %s", n, fnv1a(p, n), out);
    free(out);
}

static void agent_message(VDAgentMessage *m) {
    unsigned char *d = m->data;
    uint32_t n = m->size;
    switch (m->type) {
    case VD_AGENT_ANNOUNCE_CAPABILITIES:
        if (n >= 4 && *(uint32_t *)d) agent_caps(0);
        say("CLIP CAPS");
        break;
    case VD_AGENT_CLIPBOARD_GRAB:
        /* selection (4), serial (4), types */
        if (n >= 8 && d[0] == VD_AGENT_CLIPBOARD_SELECTION_CLIPBOARD) {
            uint32_t serial = *(uint32_t *)(d + 4);
            if (serial + 1 > agent_serial) agent_serial = serial + 1;
            free(clip_text); clip_text = NULL; clip_len = 0;
            say("CLIP GRAB %u", serial);
        }
        break;
    case VD_AGENT_CLIPBOARD_RELEASE:
        if (n >= 4 && d[0] == VD_AGENT_CLIPBOARD_SELECTION_CLIPBOARD) say("CLIP RELEASE");
        break;
    case VD_AGENT_CLIPBOARD_REQUEST: {
        /* The host pastes what the guest copied. */
        unsigned char head[8] = { VD_AGENT_CLIPBOARD_SELECTION_CLIPBOARD, 0, 0, 0 };
        uint32_t type = VD_AGENT_CLIPBOARD_UTF8_TEXT;
        memcpy(head + 4, &type, 4);
        agent_send(VD_AGENT_CLIPBOARD, head, 8, clip_text, clip_len);
        break;
    }
    case VD_AGENT_CLIPBOARD:
        if (n >= 8 && paste_deadline) {
            paste_deadline = 0;
            print_paste(d + 8, n - 8);
        }
        break;
    default:
        break;
    }
}

static void agent_read(void) {
    unsigned char buf[65536];
    for (;;) {
        ssize_t r = read(vport, buf, sizeof buf);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
            /* QEMU closed its side (a serial reset): open again, announce again. */
            agent_close();
            usleep(50000);
            agent_open();
            return;
        }
        if (r < 0) return;
        if (agent_used + (size_t)r > agent_cap) {
            size_t cap = agent_cap ? agent_cap : 65536;
            while (cap < agent_used + (size_t)r) cap *= 2;
            if (cap > AGENT_MAX_MSG * 2) { agent_used = 0; say("ERR clipboard message too large"); return; }
            agent_in = realloc(agent_in, cap);
            agent_cap = cap;
        }
        memcpy(agent_in + agent_used, buf, (size_t)r);
        agent_used += (size_t)r;
        /* Chunks in, their payloads joined in place, whole messages out. */
        static size_t joined;   /* bytes at the front that are message bytes already */
        if (joined > agent_used) joined = 0;
        for (;;) {
            size_t off = joined;
            if (agent_used - off < sizeof(VDIChunkHeader)) break;
            VDIChunkHeader ch;
            memcpy(&ch, agent_in + off, sizeof ch);
            if (agent_used - off - sizeof ch < ch.size) break;
            memmove(agent_in + off, agent_in + off + sizeof ch, agent_used - off - sizeof ch);
            agent_used -= sizeof ch;
            joined += ch.size;
            while (joined >= sizeof(VDAgentMessage)) {
                VDAgentMessage *m = (VDAgentMessage *)agent_in;
                size_t whole = sizeof *m + m->size;
                if (m->size > AGENT_MAX_MSG) { agent_used = joined = 0; break; }
                if (joined < whole) break;
                agent_message(m);
                memmove(agent_in, agent_in + whole, agent_used - whole);
                agent_used -= whole;
                joined -= whole;
            }
        }
    }
}

static void agent_copy(const unsigned char *text, size_t n) {
    unsigned char head[12] = { VD_AGENT_CLIPBOARD_SELECTION_CLIPBOARD, 0, 0, 0 };
    uint32_t serial = agent_serial++, type = VD_AGENT_CLIPBOARD_UTF8_TEXT;
    free(clip_text);
    clip_text = malloc(n ? n : 1);
    if (n) memcpy(clip_text, text, n);
    clip_len = n;
    memcpy(head + 4, &serial, 4);
    memcpy(head + 8, &type, 4);
    agent_send(VD_AGENT_CLIPBOARD_GRAB, head, 12, NULL, 0);
    say("OK copy %zu %08x", n, fnv1a(text, n));
}

static void agent_command(const char *op, char *line) {
    if (vport < 0) { say("ERR no clipboard agent"); return; }
    if (!strcmp(op, "copy")) {
        char *t = line + strspn(line, " ") + 4, *o;
        if (*t == ' ') t++;
        o = t;
        for (char *i = t; *i; i++) {
            if (*i == '\\' && i[1]) {
                i++;
                *o++ = *i == 'n' ? '\n' : *i == 't' ? '\t' : *i;
            } else {
                *o++ = *i;
            }
        }
        agent_copy((unsigned char *)t, (size_t)(o - t));
    } else if (!strcmp(op, "copygen")) {
        unsigned n = 0;
        sscanf(line, "%*s %u", &n);
        unsigned char *t = malloc(n + 64);
        size_t len = 0;
        for (unsigned i = 0; len < n; i++) len += (size_t)sprintf((char *)t + len, "line %06u abcdefghijklmnopqrstuvwxyz\n", i);
        agent_copy(t, n);
        free(t);
    } else if (!strcmp(op, "paste")) {
        unsigned char head[8] = { VD_AGENT_CLIPBOARD_SELECTION_CLIPBOARD, 0, 0, 0 };
        uint32_t type = VD_AGENT_CLIPBOARD_UTF8_TEXT;
        memcpy(head + 4, &type, 4);
        paste_deadline = now_ms() + 8000;
        agent_send(VD_AGENT_CLIPBOARD_REQUEST, head, 8, NULL, 0);
    } else if (!strcmp(op, "release")) {
        unsigned char head[4] = { VD_AGENT_CLIPBOARD_SELECTION_CLIPBOARD, 0, 0, 0 };
        agent_send(VD_AGENT_CLIPBOARD_RELEASE, head, 4, NULL, 0);
        say("OK release");
    }
}

int main(void) {
    char buf[512];
    size_t used = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    open_inputs();
    agent_open();
    say("CLIP AGENT %s", vport >= 0 ? vport_path : "none");
    say("READY");
    for (;;) {
        struct pollfd p[MAX_INPUTS + 2];
        int np = ninputs + 1, timeout = -1;
        p[0].fd = 0; p[0].events = POLLIN;
        for (int i = 0; i < ninputs; i++) { p[i + 1].fd = inputs[i]; p[i + 1].events = POLLIN; }
        if (vport < 0 && vport_path[0]) agent_open();
        if (vport >= 0) { p[np].fd = vport; p[np].events = POLLIN; p[np].revents = 0; np++; }
        if (paste_deadline) {
            double left = paste_deadline - now_ms();
            if (left <= 0) { paste_deadline = 0; say("PASTE-TIMEOUT"); }
            else timeout = (int)left + 1;
        }
        if (vport < 0 && vport_path[0]) timeout = timeout < 0 || timeout > 200 ? 200 : timeout;
        if (poll(p, np, timeout) < 0) continue;
        if (np > ninputs + 1 && (p[ninputs + 1].revents & (POLLIN | POLLHUP | POLLERR))) agent_read();
        for (int i = 0; i < ninputs; i++) {
            struct input_event ev;
            if (!(p[i + 1].revents & POLLIN)) continue;
            while (read(inputs[i], &ev, sizeof ev) == sizeof ev) {
                if (ev.type == EV_SYN || ev.type == EV_MSC) continue;
                say("EV %d %u %u %d", i, ev.type, ev.code, ev.value);
                if (keybox && d.kind && ev.type == EV_KEY && ev.value == 1)
                    rect(0, 0, 64, 64, hash(ev.code) & 0xffffff);
            }
        }
        if (p[0].revents & POLLIN) {
            ssize_t n = read(0, buf + used, sizeof buf - 1 - used);
            if (n <= 0) continue;
            used += n;
            for (;;) {
                char *nl = memchr(buf, '\n', used);
                size_t len;
                if (!nl) {
                    if (used == sizeof buf - 1) used = 0; /* overlong line: drop */
                    break;
                }
                *nl = 0;
                len = nl - buf + 1;
                if (nl > buf && nl[-1] == '\r') nl[-1] = 0;
                command(buf);
                memmove(buf, buf + len, used - len);
                used -= len;
            }
        }
    }
}
