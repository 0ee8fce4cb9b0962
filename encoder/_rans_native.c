/*
 * Native fast path of the kvrecall static-table rANS coder (docs/format.md, section 3).
 *
 * Module ``kvrecall.encoder._rans_native``; the Python wrapper ``kvrecall.encoder.native`` prepares and checks the
 * arguments (dtypes, shapes, table ids) and is the only intended caller. This file still re-checks every index it
 * dereferences, so a wrong call raises ValueError instead of reading out of bounds.
 *
 * Only the Python C API and the buffer protocol are used (no numpy headers): building needs gcc + Python headers.
 *
 * decode_streams(words, starts, ends, lengths, table_ids, lut, value_lut, out, bad, scale_bits, group, stream_major,
 *                n_threads=1)
 *     Decode S streams into out[n_max, S] (row i = symbol i of every stream, the layout of
 *     kvrecall.encoder.rans.decode_lockstep) or, with stream_major, into out[S, n_max]. words: uint16; table_ids:
 *     uint32 [group, S]; lut: uint32 [n_tables * M]; value_lut/out: unsigned items of one size (1, 2, 4 or 8 bytes).
 *     Positions at or past a stream's length get value_lut[0] (what the numpy reference leaves there). bad[s] is set
 *     to 1 for every stream that does not end in state 2**16 with exactly its words consumed, or whose word range
 *     lies outside words. Returns the number of bad streams, or -1 when lut/value_lut are not in the canonical form
 *     build_tables makes (the caller then uses the numpy reference). n_threads > 1 splits the streams over threads.
 *
 * encode_streams(symbols, table_ids, sizes, abase, freq, cum, out, counts, n_streams, n, table_cols, scale_bits)
 *     Encode S equal-length streams (twin of encode_lockstep). Returns the total number of words written to out,
 *     or -1 - i if symbol i (flat index) lies outside its table's alphabet.
 *
 * The GIL is released around both loops.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if !defined(_WIN32) && !defined(RANS_NO_THREADS)
#include <pthread.h>
#define RANS_HAVE_PTHREADS 1
#endif
/* Most threads one decode call uses (the caller asks for a number; see kvrecall.encoder.native). */
#define MAX_THREADS 64

#define RANS_L 65536u
/* Streams decoded together in one iteration: independent dependency chains hide the table-load latency. */
#ifndef LANES
#define LANES 8
#endif
/* Steps decoded without a per-read bounds check when every stream of the group has at least this many words left. */
#define BLOCK 32
/* Streams whose BLOCK-step tiles are written before moving on (SUPER int32 outputs fill one cache line per row). */
#ifndef SUPER
#define SUPER 16
#endif

/* ------------------------------------------------------------------------------------------------------------ */
/* buffers */

typedef struct {
    Py_buffer views[12];
    int n;
} BufferSet;

static void release_all(BufferSet *set) {
    for (int i = 0; i < set->n; i++) PyBuffer_Release(&set->views[i]);
    set->n = 0;
}

/* Acquire a C-contiguous buffer whose item size is one of the sizes allowed by `sizes_mask` (bit k = 2**k bytes). */
static Py_buffer *get_buffer(BufferSet *set, PyObject *obj, int writable, int sizes_mask, const char *what) {
    Py_buffer *view = &set->views[set->n];
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return NULL;
    set->n++;
    Py_ssize_t item = view->itemsize;
    int ok = (item == 1 && (sizes_mask & 1)) || (item == 2 && (sizes_mask & 2)) || (item == 4 && (sizes_mask & 4)) ||
             (item == 8 && (sizes_mask & 8));
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "%s: unsupported item size %zd", what, item);
        return NULL;
    }
    return view;
}

static Py_ssize_t n_items(const Py_buffer *v) { return v->len / v->itemsize; }

/* ------------------------------------------------------------------------------------------------------------ */
/* decoder
 *
 * The per-slot tables of the reference (lut: 4 bytes per slot, value_lut: up to 8 bytes per slot, 32+ KiB per table
 * at scale_bits 12) are first compacted, in one checked pass, into
 *   slot_sym[t * M + z]  local symbol index of slot z (uint8 when every table has <= 256 symbols, else uint16),
 *   sym[sbase[t] + a]    per symbol: freq | cum << 16, and its value,
 * which keeps the tables a group of streams touches in L1/L2. The pass also proves that lut/value_lut have the
 * canonical form (each symbol owns consecutive slots, lut = freq | (z - cum) << 16, one value per symbol), so the
 * compact decode returns exactly value_lut[t * M + z]; anything else is reported to the caller (which then uses
 * the numpy reference). */

typedef struct {
    const uint16_t *words;
    const int64_t *starts, *ends, *lengths;
    const uint64_t *tb; /* [group, n_streams]: t * M | sbase[t] << 32 */
    void *out;
    const void *filler;
    uint8_t *bad;
    int64_t n_streams, n_max, group;
    int layout;
    int64_t s_begin, s_end; /* streams this job decodes (multiples of SUPER, except s_end == n_streams) */
    const void *sl, *sy;    /* compacted tables */
    int scale_bits;
} DecodeJob;

/* Decode job's streams on n_threads threads (whole super-groups each); 0, or -2 if no thread could start. */
static int run_jobs(const DecodeJob *job, int n_threads, const void *sl, const void *sy, void *(*run)(void *)) {
    DecodeJob parts[MAX_THREADS];
    const int64_t n_super = (job->n_streams + SUPER - 1) / SUPER;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads > n_super) n_threads = (int)n_super;
    if (n_threads < 1) n_threads = 1;
    for (int t = 0; t < n_threads; t++) {
        parts[t] = *job;
        parts[t].sl = sl;
        parts[t].sy = sy;
        parts[t].s_begin = n_super * t / n_threads * SUPER;
        int64_t e = n_super * (t + 1) / n_threads * SUPER;
        parts[t].s_end = e < job->n_streams ? e : job->n_streams;
    }
#if defined(RANS_HAVE_PTHREADS)
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < n_threads; t++) started[t] = pthread_create(&tid[t], NULL, run, &parts[t]) == 0;
    run(&parts[0]);
    for (int t = 1; t < n_threads; t++) {
        if (started[t]) {
            pthread_join(tid[t], NULL);
        } else {
            run(&parts[t]); /* could not start a thread: do its share here */
        }
    }
#else
    for (int t = 0; t < n_threads; t++) run(&parts[t]);
#endif
    return 0;
}

/* One rANS decode step, branch-free. X: state; FC: freq | cum << 16 of the symbol owning slot Z; W: the word at the
 * stream's read position POS (an int64 word index; the caller guarantees the read is in bounds), which advances by
 * one when W is shifted in. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(RANS_PORTABLE_SELECT)
/* gcc turns the select into a branch, which mispredicts on about one symbol in five: cmp + cmov + adc instead */
#define RANS_STEP(X, Z, FC, SB, W, POS)                                                                           \
    do {                                                                                                           \
        uint32_t y_ = ((FC) & 0xFFFFu) * ((X) >> (SB)) + (Z) - ((FC) >> 16);                                        \
        uint32_t a_ = (y_ << 16) | (W);                                                                            \
        __asm__("cmpl $65536, %[y]\n\tcmovb %[a], %[y]\n\tadcq $0, %[i]"                                           \
                : [y] "+r"(y_), [i] "+r"(POS)                                                                      \
                : [a] "r"(a_)                                                                                      \
                : "cc");                                                                                           \
        X = y_;                                                                                                    \
    } while (0)
#else
#define RANS_STEP(X, Z, FC, SB, W, POS)                                                                           \
    do {                                                                                                           \
        uint32_t y_ = ((FC) & 0xFFFFu) * ((X) >> (SB)) + (Z) - ((FC) >> 16);                                        \
        uint32_t need_ = y_ < RANS_L;                                                                              \
        X = need_ ? ((y_ << 16) | (W)) : y_;                                                                       \
        POS += need_;                                                                                              \
    } while (0)
#endif

/* Per (slot-index type, output type): functions specialized per scale_bits (SB is a constant after inlining).
 * tb[g * S + s] = t * M | sbase[t] << 32 for the table t of stream s at step phase g.
 *
 * NAME##_one:   one stream, symbols [i0, i1), symbol i written to o[i]; every read is checked against `end` (a
 *               read past it re-reads the last word while the pointer still advances, so the stream ends with
 *               p != end and is reported bad, exactly as the numpy reference reports it).
 * NAME##_lanes: LANES streams in lockstep for up to BLOCK steps into a small tile; without per-read checks when
 *               every lane has enough words left for the block.
 * NAME##_body:  all streams, in super-groups of SUPER streams advanced block by block, so the tiles of a block
 *               fill whole output cache lines while they are in L1; layout 0 writes out[n_max, S], layout 1 writes
 *               out[S, n_max]. Streams outside whole valid lane groups and the tails past the shortest stream of a
 *               super-group go through NAME##_one. */
#define DEFINE_DECODE(NAME, SL_T, OUT_T)                                                                          \
    typedef struct {                                                                                               \
        uint32_t fc;                                                                                               \
        OUT_T v;                                                                                                   \
    } NAME##_sym;                                                                                                  \
    static inline __attribute__((always_inline)) void NAME##_one(                                                  \
        uint32_t *xp, int64_t *pp, int64_t end, const uint16_t *restrict words, const uint64_t *restrict tb_s,      \
        int64_t n_streams,                                                                                         \
        const SL_T *restrict sl, const NAME##_sym *restrict sy, OUT_T *restrict o, int64_t i0, int64_t i1,          \
        int64_t group, const int SB) {                                                                             \
        const uint32_t mask = (1u << SB) - 1u;                                                                     \
        uint32_t x = *xp;                                                                                          \
        int64_t p = *pp;                                                                                           \
        int64_t g = group > 0 ? i0 % group : 0;                                                                    \
        for (int64_t i = i0; i < i1; i++) {                                                                        \
            uint64_t tb = tb_s[g * n_streams];                                                                     \
            uint32_t z = x & mask;                                                                                 \
            const NAME##_sym *en = sy + (tb >> 32) + sl[(uint32_t)tb + z];                                         \
            uint32_t fc = en->fc;                                                                                  \
            o[i - i0] = en->v;                                                                                     \
            const int64_t at = p < end ? p : end - 1;                                                              \
            RANS_STEP(x, z, fc, SB, (uint32_t)words[at], p);                                                       \
            if (++g == group) g = 0;                                                                               \
        }                                                                                                          \
        *xp = x;                                                                                                   \
        *pp = p;                                                                                                   \
    }                                                                                                              \
    /* LANES streams in lockstep for `cnt` <= BLOCK steps from phase g; symbol j of lane k goes to o[j * js + k]. */\
    static inline __attribute__((always_inline)) void NAME##_lanes(                                                \
        uint32_t *restrict xs, int64_t *restrict ps, const int64_t *restrict ends, const uint16_t *restrict words, \
        const uint64_t *restrict tb0, int64_t n_streams, const SL_T *restrict sl, const NAME##_sym *restrict sy,   \
        OUT_T *restrict o, int64_t js, int cnt, int64_t g, int64_t group, const int SB) {                          \
        const uint32_t mask = (1u << SB) - 1u;                                                                     \
        uint32_t x[LANES];                                                                                         \
        int64_t ptr[LANES];                                                                                        \
        int64_t room = INT64_MAX;                                                                                  \
        for (int k = 0; k < LANES; k++) {                                                                          \
            x[k] = xs[k];                                                                                          \
            ptr[k] = ps[k];                                                                                        \
            int64_t left = ends[k] - ptr[k];                                                                       \
            if (left < room) room = left;                                                                          \
        }                                                                                                          \
        if (room >= cnt) { /* at most cnt reads per lane: every read stays below its stream's end */               \
            for (int j = 0; j < cnt; j++) {                                                                        \
                const uint64_t *tb = tb0 + g * n_streams;                                                          \
                _Pragma("GCC unroll 16") for (int k = 0; k < LANES; k++) {                                         \
                    uint32_t z = x[k] & mask;                                                                      \
                    const NAME##_sym *en = sy + (tb[k] >> 32) + sl[(uint32_t)tb[k] + z];                           \
                    uint32_t fc = en->fc;                                                                          \
                    o[j * js + k] = en->v;                                                                         \
                    RANS_STEP(x[k], z, fc, SB, (uint32_t)words[ptr[k]], ptr[k]);                                   \
                }                                                                                                  \
                if (++g == group) g = 0;                                                                           \
            }                                                                                                      \
        } else {                                                                                                   \
            for (int j = 0; j < cnt; j++) {                                                                        \
                const uint64_t *tb = tb0 + g * n_streams;                                                          \
                for (int k = 0; k < LANES; k++) {                                                                  \
                    uint32_t z = x[k] & mask;                                                                      \
                    const NAME##_sym *en = sy + (tb[k] >> 32) + sl[(uint32_t)tb[k] + z];                           \
                    uint32_t fc = en->fc;                                                                          \
                    o[j * js + k] = en->v;                                                                         \
                    const int64_t at = ptr[k] < ends[k] ? ptr[k] : ends[k] - 1;                                    \
                    RANS_STEP(x[k], z, fc, SB, (uint32_t)words[at], ptr[k]);                                       \
                }                                                                                                  \
                if (++g == group) g = 0;                                                                           \
            }                                                                                                      \
        }                                                                                                          \
        for (int k = 0; k < LANES; k++) {                                                                          \
            xs[k] = x[k];                                                                                          \
            ps[k] = ptr[k];                                                                                        \
        }                                                                                                          \
    }                                                                                                              \
    static inline __attribute__((always_inline)) void NAME##_body(const DecodeJob *job, const SL_T *restrict sl,   \
                                                                   const NAME##_sym *restrict sy, const int SB) {  \
        const int64_t n_streams = job->n_streams, n_max = job->n_max, group = job->group;                          \
        const int64_t *restrict lengths = job->lengths;                                                            \
        uint8_t *restrict bad = job->bad;                                                                          \
        OUT_T *restrict out = (OUT_T *)job->out;                                                                   \
        const OUT_T filler = *(const OUT_T *)job->filler;                                                          \
        const int layout = job->layout;                                                                            \
        /* element (i, s) lives at out[i * rs + s * ss] */                                                         \
        const int64_t rs = layout ? 1 : n_streams, ss = layout ? n_max : 1;                                       \
        uint32_t x[SUPER];                                                                                         \
        const uint16_t *restrict words = job->words;                                                               \
        int64_t ptr[SUPER], end[SUPER];                                                                            \
        OUT_T tile[BLOCK * LANES];                                                                                 \
        for (int64_t s0 = job->s_begin; s0 < job->s_end; s0 += SUPER) {                                            \
            const int64_t w = s0 + SUPER < n_streams ? SUPER : n_streams - s0;                                     \
            /* lockstep part: whole groups of LANES valid streams, up to the shortest of them */                  \
            int64_t n_lanes = 0, n_common = n_max;                                                                 \
            for (int64_t k = 0; k < w; k++) {                                                                      \
                const int64_t s = s0 + k;                                                                          \
                const int64_t st = job->starts[s];                                                                 \
                end[k] = job->ends[s];                                                                             \
                x[k] = 0;                                                                                          \
                ptr[k] = end[k];                                                                                   \
                if (!bad[s]) { /* the word range was validated: both state words lie inside it */                  \
                    x[k] = ((uint32_t)words[st] << 16) | (uint32_t)words[st + 1];                                  \
                    ptr[k] = st + 2;                                                                               \
                }                                                                                                  \
            }                                                                                                      \
            while (n_lanes + LANES <= w) {                                                                         \
                int ok = 1;                                                                                        \
                int64_t shortest = n_common;                                                                       \
                for (int k = 0; k < LANES; k++) {                                                                  \
                    if (bad[s0 + n_lanes + k]) ok = 0;                                                             \
                    if (lengths[s0 + n_lanes + k] < shortest) shortest = lengths[s0 + n_lanes + k];                \
                }                                                                                                  \
                if (!ok) break;                                                                                    \
                n_common = shortest;                                                                               \
                n_lanes += LANES;                                                                                  \
            }                                                                                                      \
            if (n_lanes == 0) n_common = 0;                                                                        \
            for (int64_t i0 = 0; i0 < n_common; i0 += BLOCK) {                                                     \
                const int cnt = (int)(n_common - i0 < BLOCK ? n_common - i0 : BLOCK);                              \
                const int64_t g = i0 % group;                                                                      \
                for (int64_t l0 = 0; l0 < n_lanes; l0 += LANES) {                                                  \
                    if (!layout) { /* straight into the output rows */                                             \
                        NAME##_lanes(x + l0, ptr + l0, end + l0, words, job->tb + s0 + l0, n_streams, sl, sy,      \
                                     out + i0 * n_streams + s0 + l0, n_streams, cnt, g, group, SB);                \
                    } else { /* through the tile, then down each stream's row */                                   \
                        NAME##_lanes(x + l0, ptr + l0, end + l0, words, job->tb + s0 + l0, n_streams, sl, sy,      \
                                     tile, LANES, cnt, g, group, SB);                                              \
                        for (int k = 0; k < LANES; k++) {                                                          \
                            OUT_T *col = out + (s0 + l0 + k) * n_max + i0;                                         \
                            for (int j = 0; j < cnt; j++) col[j] = tile[j * LANES + k];                            \
                        }                                                                                          \
                    }                                                                                              \
                }                                                                                                  \
            }                                                                                                      \
            /* the rest of every stream, one at a time (through the tile, BLOCK symbols at a time) */              \
            for (int64_t k = 0; k < w; k++) {                                                                      \
                const int64_t s = s0 + k;                                                                          \
                const int64_t i_start = k < n_lanes ? n_common : 0;                                                \
                const int64_t len = bad[s] ? 0 : lengths[s];                                                       \
                for (int64_t i0 = i_start; i0 < len; i0 += BLOCK) {                                                \
                    const int64_t i1 = i0 + BLOCK < len ? i0 + BLOCK : len;                                        \
                    NAME##_one(&x[k], &ptr[k], end[k], words, job->tb + s, n_streams, sl, sy, tile, i0, i1, group,        \
                               SB);                                                                                \
                    for (int64_t i = i0; i < i1; i++) out[i * rs + s * ss] = tile[i - i0];                         \
                }                                                                                                  \
                if (!bad[s] && (x[k] != RANS_L || ptr[k] != end[k])) bad[s] = 1;                                   \
                for (int64_t i = len > i_start ? len : i_start; i < n_max; i++) out[i * rs + s * ss] = filler;     \
            }                                                                                                      \
        }                                                                                                          \
    }                                                                                                              \
    static void *NAME##_run(void *arg) {                                                                           \
        const DecodeJob *job = (const DecodeJob *)arg;                                                             \
        const SL_T *sl = (const SL_T *)job->sl;                                                                    \
        const NAME##_sym *sy = (const NAME##_sym *)job->sy;                                                        \
        switch (job->scale_bits) {                                                                                 \
            case 12: NAME##_body(job, sl, sy, 12); break;                                                          \
            case 13: NAME##_body(job, sl, sy, 13); break;                                                          \
            case 14: NAME##_body(job, sl, sy, 14); break;                                                          \
            default: NAME##_body(job, sl, sy, 15); break;                                                          \
        }                                                                                                          \
        return NULL;                                                                                               \
    }                                                                                                              \
    /* Compact the tables (see above), then decode. Returns 0, -1 if the tables are not in canonical form, -2 when \
     * out of memory. */                                                                                           \
    static int NAME(const DecodeJob *job, const uint32_t *lut, const OUT_T *vlut, int64_t n_tables,                \
                    const uint32_t *sym_count, const uint32_t *sbase, int64_t total_syms, int scale_bits,          \
                    int n_threads) {                                                                               \
        const int64_t m = (int64_t)1 << scale_bits;                                                                \
        SL_T *sl = (SL_T *)malloc((size_t)(n_tables * m) * sizeof(SL_T));                                          \
        NAME##_sym *sy = (NAME##_sym *)malloc((size_t)(total_syms > 0 ? total_syms : 1) * sizeof(NAME##_sym));     \
        int rc = 0;                                                                                                \
        if (!sl || !sy) {                                                                                          \
            rc = -2;                                                                                               \
            goto done;                                                                                             \
        }                                                                                                          \
        for (int64_t t = 0; t < n_tables; t++) {                                                                   \
            const uint32_t *lt = lut + t * m;                                                                      \
            const OUT_T *vt = vlut + t * m;                                                                        \
            SL_T *st = sl + t * m;                                                                                 \
            NAME##_sym *yt = sy + sbase[t];                                                                        \
            uint32_t a = 0;                                                                                        \
            for (int64_t z = 0; z < m;) {                                                                          \
                uint32_t f = lt[z] & 0xFFFFu;                                                                      \
                OUT_T v = vt[z];                                                                                   \
                /* (the counting pass already proved this table canonical; a = its symbol index) */                \
                yt[a].fc = f | ((uint32_t)z << 16);                                                                \
                yt[a].v = v;                                                                                       \
                for (uint32_t u = 0; u < f; u++) st[z + u] = (SL_T)a;                                              \
                z += f;                                                                                            \
                a++;                                                                                               \
            }                                                                                                      \
            (void)sym_count;                                                                                       \
        }                                                                                                          \
        rc = run_jobs(job, n_threads, sl, sy, NAME##_run);                                                         \
    done:                                                                                                          \
        free(sl);                                                                                                  \
        free(sy);                                                                                                  \
        return rc;                                                                                                 \
    }


#define DEFINE_CANON(NAME, OUT_T)                                                                                 \
    /* Check that every table is canonical and count its symbols; 0 if all are, -1 otherwise. */                   \
    static int NAME(const uint32_t *lut, const OUT_T *vlut, int64_t n_tables, int64_t m, uint32_t *sym_count) {    \
        for (int64_t t = 0; t < n_tables; t++) {                                                                   \
            const uint32_t *lt = lut + t * m;                                                                      \
            const OUT_T *vt = vlut + t * m;                                                                        \
            uint32_t a = 0;                                                                                        \
            for (int64_t z = 0; z < m;) {                                                                          \
                uint32_t e = lt[z], f = e & 0xFFFFu;                                                               \
                if ((e >> 16) != 0 || f == 0 || z + f > m) return -1;                                              \
                const OUT_T v = vt[z];                                                                             \
                uint32_t diff = 0;                                                                                 \
                OUT_T vdiff = 0;                                                                                   \
                for (uint32_t u = 1; u < f; u++) { /* no early exit: this loop vectorizes */                       \
                    diff |= lt[z + u] ^ (f | (u << 16));                                                           \
                    vdiff |= vt[z + u] ^ v;                                                                        \
                }                                                                                                  \
                if (diff || vdiff) return -1;                                                                      \
                z += f;                                                                                            \
                a++;                                                                                               \
            }                                                                                                      \
            sym_count[t] = a;                                                                                      \
        }                                                                                                          \
        return 0;                                                                                                  \
    }

DEFINE_CANON(canon_o1, uint8_t)
DEFINE_CANON(canon_o2, uint16_t)
DEFINE_CANON(canon_o4, uint32_t)
DEFINE_CANON(canon_o8, uint64_t)
DEFINE_DECODE(decode_s8_o1, uint8_t, uint8_t)
DEFINE_DECODE(decode_s8_o2, uint8_t, uint16_t)
DEFINE_DECODE(decode_s8_o4, uint8_t, uint32_t)
DEFINE_DECODE(decode_s8_o8, uint8_t, uint64_t)
DEFINE_DECODE(decode_s16_o1, uint16_t, uint8_t)
DEFINE_DECODE(decode_s16_o2, uint16_t, uint16_t)
DEFINE_DECODE(decode_s16_o4, uint16_t, uint32_t)
DEFINE_DECODE(decode_s16_o8, uint16_t, uint64_t)

static PyObject *decode_streams(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_words, *o_starts, *o_ends, *o_lengths, *o_tids, *o_lut, *o_vlut, *o_out, *o_bad;
    int scale_bits, layout, n_threads = 1;
    Py_ssize_t group;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOinp|i:decode_streams", &o_words, &o_starts, &o_ends, &o_lengths, &o_tids,
                          &o_lut, &o_vlut, &o_out, &o_bad, &scale_bits, &group, &layout, &n_threads))
        return NULL;
    BufferSet set = {.n = 0};
    uint32_t *sym_count = NULL, *sbase = NULL;
    uint64_t *tb = NULL;
    Py_buffer *words = get_buffer(&set, o_words, 0, 2, "words");
    Py_buffer *starts = words ? get_buffer(&set, o_starts, 0, 8, "starts") : NULL;
    Py_buffer *ends = starts ? get_buffer(&set, o_ends, 0, 8, "ends") : NULL;
    Py_buffer *lengths = ends ? get_buffer(&set, o_lengths, 0, 8, "lengths") : NULL;
    Py_buffer *tids = lengths ? get_buffer(&set, o_tids, 0, 4, "table_ids") : NULL;
    Py_buffer *lut = tids ? get_buffer(&set, o_lut, 0, 4, "lut") : NULL;
    Py_buffer *vlut = lut ? get_buffer(&set, o_vlut, 0, 1 | 2 | 4 | 8, "value_lut") : NULL;
    Py_buffer *out = vlut ? get_buffer(&set, o_out, 1, 1 | 2 | 4 | 8, "out") : NULL;
    Py_buffer *bad = out ? get_buffer(&set, o_bad, 1, 1, "bad") : NULL;
    if (!bad) goto fail;

    const int64_t S = n_items(starts);
    const int64_t W = n_items(words);
    const int64_t *st = (const int64_t *)starts->buf, *en = (const int64_t *)ends->buf;
    const int64_t *ln = (const int64_t *)lengths->buf;
    if (scale_bits < 12 || scale_bits > 15) {
        PyErr_Format(PyExc_ValueError, "scale_bits must be in [12, 15], got %d", scale_bits);
        goto fail;
    }
    const int64_t m = (int64_t)1 << scale_bits;
    if (n_items(ends) != S || n_items(lengths) != S || n_items(bad) != S) {
        PyErr_SetString(PyExc_ValueError, "starts, ends, lengths and bad must have one entry per stream");
        goto fail;
    }
    if (group < 1 || n_items(tids) != (Py_ssize_t)group * S) {
        PyErr_SetString(PyExc_ValueError, "table_ids must hold group * n_streams entries");
        goto fail;
    }
    const int64_t n_tables = n_items(lut) / m;
    if (n_tables < 1 || n_items(lut) != n_tables * m || n_items(lut) > (int64_t)UINT32_MAX ||
        n_items(vlut) != n_items(lut) || vlut->itemsize != out->itemsize) {
        PyErr_SetString(PyExc_ValueError, "lut and value_lut must hold n_tables * M entries, value_lut like out");
        goto fail;
    }
    int64_t n_max = 0;
    for (int64_t s = 0; s < S; s++) {
        if (ln[s] < 0) {
            PyErr_SetString(PyExc_ValueError, "negative stream length");
            goto fail;
        }
        if (ln[s] > n_max) n_max = ln[s];
    }
    if (S > 0 && (n_max > PY_SSIZE_T_MAX / 16 / S || n_items(out) != n_max * S)) {
        PyErr_SetString(PyExc_ValueError, "out must hold max(lengths) * n_streams entries");
        goto fail;
    }
    const uint32_t *ti = (const uint32_t *)tids->buf;
    for (int64_t j = 0; j < (int64_t)group * S; j++) {
        if (ti[j] >= (uint64_t)n_tables) {
            PyErr_SetString(PyExc_ValueError, "table id outside the lookup tables");
            goto fail;
        }
    }
    uint8_t *bd = (uint8_t *)bad->buf;
    for (int64_t s = 0; s < S; s++) {
        /* a stream needs its two state words inside the buffer; otherwise it is reported bad, never read */
        bd[s] = !(st[s] >= 0 && en[s] <= W && en[s] - st[s] >= 2);
    }
    sym_count = (uint32_t *)PyMem_RawMalloc((size_t)n_tables * sizeof(uint32_t));
    sbase = (uint32_t *)PyMem_RawMalloc((size_t)n_tables * sizeof(uint32_t));
    tb = (uint64_t *)PyMem_RawMalloc((size_t)(group * S > 0 ? group * S : 1) * sizeof(uint64_t));
    if (!sym_count || !sbase || !tb) {
        PyErr_NoMemory();
        goto fail;
    }
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS;
    switch (out->itemsize) {
        case 1: rc = canon_o1((const uint32_t *)lut->buf, (const uint8_t *)vlut->buf, n_tables, m, sym_count); break;
        case 2: rc = canon_o2((const uint32_t *)lut->buf, (const uint16_t *)vlut->buf, n_tables, m, sym_count); break;
        case 4: rc = canon_o4((const uint32_t *)lut->buf, (const uint32_t *)vlut->buf, n_tables, m, sym_count); break;
        default: rc = canon_o8((const uint32_t *)lut->buf, (const uint64_t *)vlut->buf, n_tables, m, sym_count); break;
    }
    int64_t total = 0;
    uint32_t widest = 0;
    if (rc == 0) {
        for (int64_t t = 0; t < n_tables; t++) {
            sbase[t] = (uint32_t)total; /* total <= n_tables * M <= n_items(lut), far below 2**32 for real tables */
            total += sym_count[t];
            if (sym_count[t] > widest) widest = sym_count[t];
        }
        if (total > (int64_t)UINT32_MAX) rc = -1;
    }
    if (rc == 0) {
        for (int64_t j = 0; j < (int64_t)group * S; j++) tb[j] = (uint64_t)ti[j] * (uint64_t)m | (uint64_t)sbase[ti[j]] << 32;
        DecodeJob job = {
            .words = (const uint16_t *)words->buf, .starts = st, .ends = en, .lengths = ln, .tb = tb,
            .out = out->buf, .filler = vlut->buf, .bad = bd, .n_streams = S, .n_max = n_max, .group = group,
            .layout = layout, .s_begin = 0, .s_end = S, .sl = NULL, .sy = NULL, .scale_bits = scale_bits,
        };
#define CALL(FN, OT)                                                                                              \
    rc = FN(&job, (const uint32_t *)lut->buf, (const OT *)vlut->buf, n_tables, sym_count, sbase, total, scale_bits,  \
            n_threads)
        if (widest <= 256) {
            switch (out->itemsize) {
                case 1: CALL(decode_s8_o1, uint8_t); break;
                case 2: CALL(decode_s8_o2, uint16_t); break;
                case 4: CALL(decode_s8_o4, uint32_t); break;
                default: CALL(decode_s8_o8, uint64_t); break;
            }
        } else {
            switch (out->itemsize) {
                case 1: CALL(decode_s16_o1, uint8_t); break;
                case 2: CALL(decode_s16_o2, uint16_t); break;
                case 4: CALL(decode_s16_o4, uint32_t); break;
                default: CALL(decode_s16_o8, uint64_t); break;
            }
        }
#undef CALL
    }
    Py_END_ALLOW_THREADS;
    PyMem_RawFree(sym_count);
    PyMem_RawFree(sbase);
    PyMem_RawFree(tb);
    sym_count = sbase = NULL;
    tb = NULL;
    if (rc == -2) {
        PyErr_NoMemory();
        goto fail;
    }
    Py_ssize_t n_bad = -1; /* -1: tables not in canonical form (the caller uses the reference decoder) */
    if (rc == 0) {
        n_bad = 0;
        for (int64_t s = 0; s < S; s++) n_bad += bd[s];
    }
    release_all(&set);
    return PyLong_FromSsize_t(n_bad);
fail:
    PyMem_RawFree(sym_count);
    PyMem_RawFree(sbase);
    PyMem_RawFree(tb);
    release_all(&set);
    return NULL;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* encoder */

/* Encode one stream of n symbols (decode order) backwards into scratch; returns the words written to dst. */
#define DEFINE_ENCODE(NAME, SYM_T)                                                                                \
    static int64_t NAME(const SYM_T *restrict sym, const int32_t *restrict tids, int64_t n_streams, int64_t n,      \
                        int64_t tcols, const int64_t *restrict sizes, const int64_t *restrict abase,               \
                        const uint32_t *restrict freq, const uint32_t *restrict cum, uint16_t *restrict out,       \
                        int64_t *restrict counts, uint16_t *restrict scratch, int scale_bits) {                    \
        int64_t cursor = 0;                                                                                        \
        for (int64_t s = 0; s < n_streams; s++) {                                                                  \
            const SYM_T *row = sym + s * n;                                                                        \
            const int32_t *trow = tids + s * tcols;                                                                \
            uint32_t x = RANS_L;                                                                                   \
            int64_t back = n; /* scratch[back..n) holds the emitted words in decode order */                       \
            int64_t c = n == 0 ? 0 : (n - 1) % tcols;                                                              \
            for (int64_t i = n - 1; i >= 0; i--) {                                                                 \
                int64_t a = (int64_t)row[i];                                                                       \
                int32_t t = trow[c];                                                                               \
                if (c-- == 0) c = tcols - 1;                                                                       \
                if (a < 0 || a >= sizes[t]) return -1 - (s * n + i);                                               \
                int64_t gi = abase[t] + a;                                                                         \
                uint32_t f = freq[gi];                                                                             \
                if (x >= (f << (32 - scale_bits))) {                                                               \
                    scratch[--back] = (uint16_t)(x & 0xFFFFu);                                                     \
                    x >>= 16;                                                                                      \
                }                                                                                                  \
                uint32_t q = x / f;                                                                                \
                x = (q << scale_bits) + (x - q * f) + cum[gi];                                                     \
            }                                                                                                      \
            out[cursor] = (uint16_t)(x >> 16);                                                                     \
            out[cursor + 1] = (uint16_t)(x & 0xFFFFu);                                                             \
            memcpy(out + cursor + 2, scratch + back, (size_t)(n - back) * sizeof(uint16_t));                       \
            counts[s] = n - back + 2;                                                                              \
            cursor += counts[s];                                                                                   \
        }                                                                                                          \
        return cursor;                                                                                             \
    }

DEFINE_ENCODE(encode_s16, uint16_t)
DEFINE_ENCODE(encode_s32, int32_t)
DEFINE_ENCODE(encode_s64, int64_t)

static PyObject *encode_streams(PyObject *self, PyObject *args) {
    PyObject *o_sym, *o_tids, *o_sizes, *o_abase, *o_freq, *o_cum, *o_out, *o_counts;
    Py_ssize_t n_streams, n, tcols;
    int scale_bits;
    if (!PyArg_ParseTuple(args, "OOOOOOOOnnni:encode_streams", &o_sym, &o_tids, &o_sizes, &o_abase, &o_freq, &o_cum,
                          &o_out, &o_counts, &n_streams, &n, &tcols, &scale_bits))
        return NULL;
    BufferSet set = {.n = 0};
    Py_buffer *sym = get_buffer(&set, o_sym, 0, 2 | 4 | 8, "symbols");
    Py_buffer *tids = sym ? get_buffer(&set, o_tids, 0, 4, "table_ids") : NULL;
    Py_buffer *sizes = tids ? get_buffer(&set, o_sizes, 0, 8, "sizes") : NULL;
    Py_buffer *abase = sizes ? get_buffer(&set, o_abase, 0, 8, "abase") : NULL;
    Py_buffer *freq = abase ? get_buffer(&set, o_freq, 0, 4, "freq") : NULL;
    Py_buffer *cum = freq ? get_buffer(&set, o_cum, 0, 4, "cum") : NULL;
    Py_buffer *out = cum ? get_buffer(&set, o_out, 1, 2, "out") : NULL;
    Py_buffer *counts = out ? get_buffer(&set, o_counts, 1, 8, "counts") : NULL;
    if (!counts) goto fail;
    if (scale_bits < 12 || scale_bits > 15) {
        PyErr_Format(PyExc_ValueError, "scale_bits must be in [12, 15], got %d", scale_bits);
        goto fail;
    }
    if (n_streams < 0 || n < 0 || tcols < 1 || (n > 0 && n % tcols != 0) ||
        (n_streams > 0 && n > PY_SSIZE_T_MAX / 4 / n_streams)) {
        PyErr_SetString(PyExc_ValueError, "bad stream shape");
        goto fail;
    }
    if (n_items(sym) != n_streams * n || n_items(tids) != n_streams * tcols || n_items(counts) != n_streams ||
        n_items(out) < n_streams * (n + 2)) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the stream shape");
        goto fail;
    }
    const int64_t nt = n_items(sizes);
    const int64_t *sz = (const int64_t *)sizes->buf, *ab = (const int64_t *)abase->buf;
    const uint32_t *fq = (const uint32_t *)freq->buf, *cm = (const uint32_t *)cum->buf;
    if (n_items(abase) != nt || n_items(freq) != n_items(cum)) {
        PyErr_SetString(PyExc_ValueError, "inconsistent table arrays");
        goto fail;
    }
    const uint32_t m = 1u << scale_bits;
    for (int64_t t = 0; t < nt; t++) {
        if (sz[t] < 1 || ab[t] < 0 || ab[t] + sz[t] > n_items(freq)) {
            PyErr_SetString(PyExc_ValueError, "table outside the frequency arrays");
            goto fail;
        }
    }
    for (int64_t j = 0; j < n_items(freq); j++) {
        if (fq[j] < 1 || fq[j] >= m || cm[j] >= m) {
            PyErr_SetString(PyExc_ValueError, "frequency or cumulative frequency out of range");
            goto fail;
        }
    }
    const int32_t *td = (const int32_t *)tids->buf;
    for (int64_t j = 0; j < n_streams * tcols; j++) {
        if (td[j] < 0 || td[j] >= nt) {
            PyErr_SetString(PyExc_ValueError, "table id out of range");
            goto fail;
        }
    }
    uint16_t *scratch = (uint16_t *)PyMem_RawMalloc((size_t)(n > 0 ? n : 1) * sizeof(uint16_t));
    if (!scratch) {
        PyErr_NoMemory();
        goto fail;
    }
    int64_t result = 0;
    Py_BEGIN_ALLOW_THREADS;
#define CALL(FN, ST)                                                                                              \
    result = FN((const ST *)sym->buf, td, n_streams, n, tcols, sz, ab, fq, cm, (uint16_t *)out->buf,             \
                (int64_t *)counts->buf, scratch, scale_bits)
    switch (sym->itemsize) {
        case 2: CALL(encode_s16, uint16_t); break;
        case 4: CALL(encode_s32, int32_t); break;
        default: CALL(encode_s64, int64_t); break;
    }
#undef CALL
    Py_END_ALLOW_THREADS;
    PyMem_RawFree(scratch);
    release_all(&set);
    return PyLong_FromLongLong(result);
fail:
    release_all(&set);
    return NULL;
}

static PyMethodDef methods[] = {
    {"decode_streams", decode_streams, METH_VARARGS,
     "decode_streams(words, starts, ends, lengths, table_ids, lut, value_lut, out, bad, scale_bits, group, "
     "stream_major, n_threads=1) -> "
     "number of bad streams"},
    {"encode_streams", encode_streams, METH_VARARGS,
     "encode_streams(symbols, table_ids, sizes, abase, freq, cum, out, counts, n_streams, n, table_cols, "
     "scale_bits) -> words written, or -1 - flat index of a symbol outside its alphabet"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rans_native", "Native rANS decode/encode loops for kvrecall (see encoder/native.py).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__rans_native(void) { return PyModule_Create(&module); }
