/*
 * Ferry memtest guest: fills memory with a verifiable pattern, keeps
 * dirtying it at a paced rate and answers commands on COM1.
 *
 * The protocol and memory layout are documented for users in
 * src/agent/guest/mod.rs; keep the two in step (PROTOCOL_VERSION).
 *
 * Built freestanding for i686 with no libgcc: no 64-bit division (see
 * udiv64), no floating point, no SSE.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define PROTOCOL_VERSION 1
#define PAGE_SIZE 4096u
#define PAGE_WORDS (PAGE_SIZE / 4u)
#define MIB 1048576u
#define TICK_HZ 1000u            /* PIT reload 1193 -> 1000.15 Hz */
#define PIT_RELOAD 1193u
#define COM1 0x3F8
#define DEBUG_EXIT_PORT 0xF4     /* -device isa-debug-exit,iobase=0xf4 */
#define EXIT_FAULT 126u          /* a CPU exception */
#define EXIT_FATAL 125u          /* unusable boot information */
#define HEADROOM (4u * MIB)      /* left free below the top of RAM */
#define LINE_MAX 80u
#define RING_SIZE 512u           /* power of two */
#define BATCH_PAGES 64u          /* pages dirtied between serial checks */
#define RATE_MAX 0xFFFFFFFFu     /* "rate max": unthrottled */
#define RATE_LIMIT 1048576u      /* highest paced rate accepted, MiB/s */
#define NO_PAGE 0xFFFFFFFFu

extern u8 __kernel_end[];
extern const u32 exc_table[32];
extern void irq_timer(void), irq_serial(void), irq_other(void);

volatile u32 ticks;              /* incremented by irq_timer */

static volatile u8 ring[RING_SIZE];
static volatile u32 ring_head, ring_tail; /* head: IRQ writes, tail: main */
static volatile u32 ring_overflow;

static struct {
    u32 *table;                  /* generation of each page */
    u32 *data;                   /* first pattern page */
    u32 pages;
    u32 step;                    /* dirtying walk: page += step mod pages */
    u32 cursor;
    u64 writes;                  /* page rewrites after the fill */
    u32 rate;                    /* MiB/s, 0 idle, RATE_MAX unthrottled */
    u32 pace_tick;               /* pacing epoch start */
    u64 pace_done;               /* pages written in this epoch */
    u32 win_tick;                /* measurement window start */
    u64 win_writes;
    u32 dirty_kib_s;             /* measured over the last window */
    u32 fill_ms;
    u32 corrupted;               /* page left corrupted, or NO_PAGE */
} st;

static u64 idt[256];

/* ---- port I/O and arithmetic ---------------------------------------- */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }

/* 64-by-32 division with two DIVs (no __udivdi3). */
static u64 udiv64(u64 n, u32 d, u32 *rem)
{
    u32 hi = (u32)(n >> 32), lo = (u32)n;
    u32 qhi = hi / d, r = hi % d, qlo;
    __asm__("divl %4" : "=a"(qlo), "=d"(r) : "a"(lo), "d"(r), "rm"(d));
    if (rem)
        *rem = r;
    return ((u64)qhi << 32) | qlo;
}

/* gcc may emit calls to these even when freestanding. */
void *memset(void *dst, int c, u32 n) { u8 *d = dst; while (n--) *d++ = (u8)c; return dst; }
void *memcpy(void *dst, const void *src, u32 n) { u8 *d = dst; const u8 *s = src; while (n--) *d++ = *s++; return dst; }

/* ---- serial console ------------------------------------------------- */

static void serial_init(void)
{
    outb(COM1 + 1, 0x00);        /* no interrupts while configuring */
    outb(COM1 + 3, 0x80);        /* DLAB */
    outb(COM1 + 0, 0x01);        /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);        /* 8N1 */
    outb(COM1 + 2, 0xC7);        /* FIFO on, cleared, 14-byte threshold */
    outb(COM1 + 4, 0x0B);        /* DTR, RTS, OUT2 (IRQ line enabled) */
}

void serial_irq(void)
{
    while (inb(COM1 + 5) & 0x01) {
        u8 c = inb(COM1);
        u32 next = (ring_head + 1) & (RING_SIZE - 1);
        if (next == ring_tail) {
            ring_overflow = 1;
        } else {
            ring[ring_head] = c;
            ring_head = next;
        }
    }
}

static void putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20))
        ;
    outb(COM1, (u8)c);
}

static void puts(const char *s) { while (*s) putc(*s++); }

static void put_u64(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        u32 r;
        v = udiv64(v, 10, &r);
        buf[--i] = (char)('0' + r);
    } while (v);
    puts(buf + i);
}

static void put_hex(u32 v)
{
    puts("0x");
    for (int s = 28; s >= 0; s -= 4)
        putc("0123456789abcdef"[(v >> s) & 15]);
}

static void kv(const char *key, u64 v) { putc(' '); puts(key); putc('='); put_u64(v); }

static void put_rate(void)
{
    puts(" rate=");
    if (st.rate == RATE_MAX)
        puts("max");
    else
        put_u64(st.rate);
}

/* ---- exits and faults ----------------------------------------------- */

static void qemu_exit(u32 code)
{
    outl(DEBUG_EXIT_PORT, code); /* QEMU exits with status code*2+1 */
    for (;;)
        __asm__ volatile("cli; hlt");
}

void trap_exception(u32 vector, u32 error, u32 eip)
{
    puts("\nFAULT");
    kv("vector", vector);
    kv("error", error);
    puts(" eip=");
    put_hex(eip);
    puts("\r\n");
    qemu_exit(EXIT_FAULT);
}

static void fatal(const char *why)
{
    puts("FATAL ");
    puts(why);
    puts("\r\n");
    qemu_exit(EXIT_FATAL);
}

/* ---- interrupts and the PIT ----------------------------------------- */

static void idt_set(u32 vec, u32 handler)
{
    idt[vec] = (u64)((handler & 0xFFFF) | (0x08u << 16)) |
               ((u64)((handler & 0xFFFF0000u) | 0x8E00u) << 32);
}

static void interrupts_init(void)
{
    static struct __attribute__((packed)) { u16 limit; u32 base; } idtr;
    for (u32 v = 0; v < 32; v++)
        idt_set(v, exc_table[v]);
    for (u32 v = 32; v < 48; v++)
        idt_set(v, (u32)irq_other);
    idt_set(32, (u32)irq_timer);
    idt_set(36, (u32)irq_serial);
    idtr.limit = sizeof(idt) - 1;
    idtr.base = (u32)idt;
    __asm__ volatile("lidt %0" : : "m"(idtr));

    /* 8259 PICs: IRQs to vectors 32..47, only IRQ0 and IRQ4 unmasked. */
    outb(0x20, 0x11); outb(0xA0, 0x11);
    outb(0x21, 32);   outb(0xA1, 40);
    outb(0x21, 4);    outb(0xA1, 2);
    outb(0x21, 1);    outb(0xA1, 1);
    outb(0x21, 0xEE); outb(0xA1, 0xFF);

    /* PIT channel 0, mode 2 (rate generator), ~1 kHz. */
    outb(0x43, 0x34);
    outb(0x40, PIT_RELOAD & 0xFF);
    outb(0x40, PIT_RELOAD >> 8);

    outb(COM1 + 1, 0x01);        /* UART: interrupt on received data */
    __asm__ volatile("sti");
}

/* ---- the pattern ---------------------------------------------------- */

static u32 page_seed(u32 page, u32 gen)
{
    u32 h = page * 0x9E3779B1u ^ gen * 0x85EBCA77u ^ 0x243F6A88u;
    h ^= h >> 16; h *= 0x7FEB352Du;
    h ^= h >> 15; h *= 0x846CA68Bu;
    h ^= h >> 16;
    return h ? h : 1;            /* xorshift32 needs a non-zero state */
}

static void write_page(u32 page, u32 gen)
{
    u32 *p = st.data + page * PAGE_WORDS;
    u32 x = page_seed(page, gen);
    p[0] = page;
    p[1] = gen;
    for (u32 k = 2; k < PAGE_WORDS; k++) {
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        p[k] = x;
    }
}

/* 1 when the page holds exactly the content of generation gen. */
static int check_page(u32 page, u32 gen)
{
    const u32 *p = st.data + page * PAGE_WORDS;
    u32 x = page_seed(page, gen), diff = (p[0] ^ page) | (p[1] ^ gen);
    for (u32 k = 2; k < PAGE_WORDS; k++) {
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        diff |= p[k] ^ x;
    }
    return diff == 0;
}

/* Rewrite the next page of the walk with its next generation. */
static void dirty_one(void)
{
    u32 page = st.cursor;
    st.cursor += st.step;
    if (st.cursor >= st.pages)
        st.cursor -= st.pages;
    if (page != st.corrupted) {  /* keep a deliberate corruption visible */
        u32 gen = st.table[page] + 1;
        write_page(page, gen);
        st.table[page] = gen;
        st.writes++;
    }
}

/* ---- commands ------------------------------------------------------- */

static int parse_u32(const char *s, u32 *out)
{
    u32 v = 0;
    if (!*s)
        return 0;
    for (; *s; s++) {
        u32 d = (u32)(*s - '0');
        if (*s < '0' || *s > '9' || v > 429496729u || (v == 429496729u && d > 5))
            return 0;            /* not a digit, or above 2^32 - 1 */
        v = v * 10 + d;
    }
    *out = v;
    return 1;
}

static int parse_rate(const char *s, u32 *out)
{
    if (s[0] == 'm' && s[1] == 'a' && s[2] == 'x' && !s[3]) {
        *out = RATE_MAX;
        return 1;
    }
    return parse_u32(s, out) && *out <= RATE_LIMIT;
}

static void set_rate(u32 rate)
{
    st.rate = rate;
    st.pace_tick = ticks;
    st.pace_done = 0;
}

static const char *word(const char *line, const char *cmd)
{
    while (*cmd && *line == *cmd) { line++; cmd++; }
    if (*cmd)
        return 0;
    if (*line == ' ') {
        while (*line == ' ') line++;
        return line;
    }
    return *line ? 0 : line;
}

static void cmd_status(void)
{
    puts("STATUS");
    kv("pages", st.pages);
    kv("gen", 1 + udiv64(st.writes, st.pages, 0));
    kv("writes", st.writes);
    put_rate();
    kv("dirty_kib_s", st.dirty_kib_s);
    kv("ticks", ticks);
    kv("fill_ms", st.fill_ms);
    kv("version", PROTOCOL_VERSION);
    puts("\r\n");
}

static void cmd_verify(void)
{
    u32 bad = 0, first = 0;
    u64 sum = 0;
    for (u32 i = 0; i < st.pages; i++) {
        u32 gen = st.table[i];
        sum += gen;
        if (!check_page(i, gen)) {
            if (!bad)
                first = i;
            bad++;
        }
    }
    /* Each page starts at generation 1 and gains one per rewrite, so the
     * table's sum is fixed by the write counter: a stale table page shows. */
    int table_ok = sum == (u64)st.pages + st.writes;
    if (!bad && table_ok) {
        puts("VERIFY OK");
        kv("pages", st.pages);
        kv("writes", st.writes);
    } else {
        puts("VERIFY BAD first=");
        if (bad)
            put_u64(first);
        else
            puts("none");
        kv("count", bad);
        kv("pages", st.pages);
        puts(table_ok ? " table=ok" : " table=bad");
    }
    puts("\r\n");
}

static void execute(const char *line)
{
    const char *arg;
    u32 n;
    if ((arg = word(line, "ping"))) {
        puts("PONG");
        if (*arg) { putc(' '); puts(arg); }
        puts("\r\n");
    } else if ((arg = word(line, "status")) && !*arg) {
        cmd_status();
    } else if ((arg = word(line, "verify")) && !*arg) {
        cmd_verify();
    } else if ((arg = word(line, "rate"))) {
        if (!parse_rate(arg, &n)) {
            puts("ERR rate wants MiB/s (0..1048576) or max\r\n");
            return;
        }
        set_rate(n);
        puts("RATE OK");
        put_rate();
        puts("\r\n");
    } else if ((arg = word(line, "corrupt"))) {
        if (!*arg)
            n = st.pages / 2;
        else if (!parse_u32(arg, &n) || n >= st.pages) {
            puts("ERR corrupt wants a page below pages\r\n");
            return;
        }
        st.data[n * PAGE_WORDS + 100] ^= 0x5A5A5A5Au;
        st.corrupted = n;
        puts("CORRUPT OK");
        kv("page", n);
        puts("\r\n");
    } else if ((arg = word(line, "exit"))) {
        if (!parse_u32(arg, &n) || n > 127) {
            puts("ERR exit wants a code 0..127\r\n");
            return;
        }
        puts("EXIT");
        kv("code", n);
        puts("\r\n");
        qemu_exit(n);
    } else if ((arg = word(line, "fault")) && !*arg) {
        __asm__ volatile("ud2");  /* proves the exception path: FAULT vector=6 */
    } else {
        puts("ERR unknown command\r\n");
    }
}

/* Assemble received bytes into lines; execute each complete line. */
static void poll_input(void)
{
    static char line[LINE_MAX + 1];
    static u32 len, too_long;
    while (ring_tail != ring_head) {
        char c = (char)ring[ring_tail];
        ring_tail = (ring_tail + 1) & (RING_SIZE - 1);
        if (c == '\r' || c == '\n') {
            line[len] = 0;
            if (too_long || ring_overflow)
                puts(too_long ? "ERR line too long\r\n" : "ERR input overflow\r\n");
            else if (len)
                execute(line);
            len = too_long = 0;
            ring_overflow = 0;
        } else if (len < LINE_MAX) {
            line[len++] = c;
        } else {
            too_long = 1;
        }
    }
}

/* ---- boot ----------------------------------------------------------- */

static char cmdline[256];

/* Value of `key=` in the command line, copied into out (NUL-terminated). */
static int option(const char *key, char *out, u32 cap)
{
    const char *s = cmdline;
    while (*s) {
        while (*s == ' ') s++;
        const char *k = key, *t = s;
        while (*k && *t == *k) { k++; t++; }
        if (!*k && *t == '=') {
            u32 n = 0;
            for (t++; *t && *t != ' ' && n + 1 < cap; t++)
                out[n++] = *t;
            out[n] = 0;
            return 1;
        }
        while (*s && *s != ' ') s++;
    }
    return 0;
}

static void layout(u32 mem_top, u32 fill_mib)
{
    u32 base = ((u32)__kernel_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
    if (mem_top < base + HEADROOM + 2 * PAGE_SIZE)
        fatal("not enough memory above the kernel");
    /* Each page costs PAGE_SIZE of data plus 4 bytes of table. */
    u32 most = (mem_top - base - HEADROOM) / (PAGE_SIZE + 4);
    u32 pages = fill_mib ? fill_mib * (MIB / PAGE_SIZE) : most;
    if (fill_mib > 4096 || pages > most || !pages)
        fatal("fill= does not fit in RAM (leave 4 MiB headroom)");
    st.pages = pages;
    st.table = (u32 *)base;
    st.data = (u32 *)(base + ((pages * 4 + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)));
    /* A prime step that does not divide pages visits every page once per pass. */
    st.step = (pages % 4099u ? 4099u : 4111u) % pages;
    st.cursor = 0;
    st.corrupted = NO_PAGE;
}

void kernel_main(u32 magic, const u32 *mbi)
{
    char val[16];
    u32 fill_mib = 0, rate = 0;

    serial_init();
    if (magic != 0x2BADB002u)
        fatal("not started by a multiboot loader");
    if (!(mbi[0] & 1))
        fatal("no memory information from the loader");
    u32 mem_top = 0x100000u + mbi[2] * 1024u;
    if (mbi[0] & 4) {            /* copy before the fill overwrites it */
        const char *src = (const char *)mbi[4];
        u32 n = 0;
        while (src[n] && n + 1 < sizeof(cmdline)) { cmdline[n] = src[n]; n++; }
    }
    if (option("fill", val, sizeof(val)) && (!parse_u32(val, &fill_mib) || !fill_mib))
        fatal("fill= wants MiB, at least 1");
    if (option("rate", val, sizeof(val)) && !parse_rate(val, &rate))
        fatal("rate= wants MiB/s (0..1048576) or max");

    interrupts_init();
    layout(mem_top, fill_mib);
    puts("\r\nFERRY-MEMTEST");
    kv("version", PROTOCOL_VERSION);
    kv("mem_kib", (mem_top - 0x100000u) / 1024u + 1024u);
    kv("pages", st.pages);
    puts(" table=");
    put_hex((u32)st.table);
    puts(" data=");
    put_hex((u32)st.data);
    puts("\r\n");

    u32 t0 = ticks;
    for (u32 i = 0; i < st.pages; i++) {
        write_page(i, 1);
        st.table[i] = 1;
    }
    st.fill_ms = ticks - t0;
    set_rate(rate);
    st.win_tick = ticks;

    puts("READY");
    kv("pages", st.pages);
    kv("fill_ms", st.fill_ms);
    put_rate();
    puts("\r\n");

    for (;;) {
        u32 budget = 0;
        poll_input();            /* may reset the pacing epoch to ticks */
        u32 now = ticks;
        if (now - st.win_tick >= TICK_HZ) {
            u64 kib = (st.writes - st.win_writes) * (PAGE_SIZE / 1024u) * TICK_HZ;
            st.dirty_kib_s = (u32)udiv64(kib, now - st.win_tick, 0);
            st.win_tick = now;
            st.win_writes = st.writes;
        }
        if (st.rate == RATE_MAX) {
            budget = BATCH_PAGES;
        } else if (st.rate) {
            /* Token bucket: pages owed since the epoch, with bounded lag
             * so a stalled vCPU does not burst afterwards. */
            u32 pps = st.rate * (MIB / PAGE_SIZE);
            u64 owed = udiv64((u64)(now - st.pace_tick) * pps, TICK_HZ, 0);
            u64 lag_cap = pps / 20 + BATCH_PAGES;
            if (owed > st.pace_done + lag_cap)
                st.pace_done = owed - lag_cap;
            if (owed > st.pace_done)
                budget = owed - st.pace_done > BATCH_PAGES ? BATCH_PAGES
                                                           : (u32)(owed - st.pace_done);
        }
        for (u32 i = 0; i < budget; i++)
            dirty_one();
        st.pace_done += budget;
        if (!budget) {
            /* Sleep until the next tick or received byte; sti;hlt is atomic. */
            __asm__ volatile("cli");
            if (ring_tail == ring_head)
                __asm__ volatile("sti; hlt");
            else
                __asm__ volatile("sti");
        }
    }
}
