// A decoding step of a Llama-architecture model kept in GGUF block quantisation (Q4_0, Q4_1,
// Q8_0), 1 to any number of token rows per call, on the CPU. Built by dflash/runtime/gguf.py
// with the machine's compiler and driven through ctypes.
//
// Why its own kernels: a block drafter verifies 4-16 tokens per step, and ggml's small-batch
// products unpack every quantised weight block once per activation row, so 4 rows cost ~2.6x
// one row. Here each group of 16 weight rows is unpacked once per 32-column block and applied to
// every activation row (the weights come from memory once per step, whatever the row count).
//
// Exactness by construction: every activation row is quantised on its own (per 32 values, as
// llama.cpp does for these weight types), its products accumulate in integers per block, and
// the float sums run over blocks, heads and positions in an order that does not depend on how
// many rows share the call. So a block of B tokens gives, bit for bit, the logits, features and
// cache entries of B one-token calls, and a prompt's prefill those of feeding it token by token.
// That holds within one instruction-set path (AVX-512 VNNI, AVX2, portable); the paths agree
// with each other only to float rounding.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <sched.h>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace {

constexpr int QK = 32;      // values per quantisation block (all supported types)
constexpr int GROUP = 16;   // weight rows interleaved together
#ifndef PREFETCH
#define PREFETCH 8         // blocks of weights requested ahead of their use
#endif
enum Type { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };  // ggml's type ids
enum Isa { PORTABLE = 0, AVX2 = 1, AVX512 = 2 };
int g_isa = PORTABLE;  // the kernel path in force (dfl_set_isa)

// ---- half precision ---------------------------------------------------------------------------

float half_to_float(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            mant &= 0x3ff;
            bits = sign | ((exp + 112) << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

float round_to_half(float f) { return float(_Float16(f)); }  // round to nearest even, as F16C does

// ---- weights ----------------------------------------------------------------------------------

// One weight matrix [n outputs, k inputs], rows interleaved by GROUP. Per (group, block):
//   Q4_0/Q4_1: 4 chunks of 64 bytes; chunk j, byte 4*o + t = the GGUF block byte 4*j + t of row o
//              (low nibble: value 4j+t, high nibble: value 16+4j+t);
//   Q8_0:      8 chunks of 64 bytes; chunk j, byte 4*o + t = value 4j+t of row o (signed);
// and per (group, block) GROUP half-precision scales d (and, Q4_1, GROUP minimums m).
struct Matrix {
    int type = -1, n = 0, k = 0, groups = 0, blocks = 0, chunk_bytes = 0;
    std::vector<uint8_t> qs;       // [groups][blocks][chunk_bytes], 64-byte aligned start
    std::vector<uint16_t> d, m;    // [groups][blocks][GROUP]

    const uint8_t* q(int g, int b) const { return qs.data() + (size_t(g) * blocks + b) * chunk_bytes; }
};

int block_bytes(int type) { return type == Q4_0 ? 18 : type == Q4_1 ? 20 : type == Q8_0 ? 34 : 0; }

// `data`: the GGUF's rows ([n][k / 32] blocks of `type`), copied into the interleaved layout
// (rows past n, up to a multiple of GROUP, are zero).
bool repack(Matrix& w, int type, const uint8_t* data, int n, int k) {
    if (block_bytes(type) == 0 || k % QK) return false;
    w.type = type; w.n = n; w.k = k;
    w.groups = (n + GROUP - 1) / GROUP; w.blocks = k / QK;
    w.chunk_bytes = type == Q8_0 ? 512 : 256;
    w.qs.assign(size_t(w.groups) * w.blocks * w.chunk_bytes, 0);
    w.d.assign(size_t(w.groups) * w.blocks * GROUP, 0);
    if (type == Q4_1) w.m.assign(w.d.size(), 0);
    const size_t row_bytes = size_t(w.blocks) * block_bytes(type);
    for (int row = 0; row < n; ++row) {
        const int g = row / GROUP, o = row % GROUP;
        for (int b = 0; b < w.blocks; ++b) {
            const uint8_t* src = data + row * row_bytes + size_t(b) * block_bytes(type);
            uint8_t* dst = w.qs.data() + (size_t(g) * w.blocks + b) * w.chunk_bytes;
            const size_t s = (size_t(g) * w.blocks + b) * GROUP + o;
            std::memcpy(&w.d[s], src, 2);
            if (type == Q4_1) std::memcpy(&w.m[s], src + 2, 2);
            const uint8_t* values = src + (type == Q4_1 ? 4 : 2);
            const int chunks = type == Q8_0 ? 8 : 4;
            for (int j = 0; j < chunks; ++j)
                for (int t = 0; t < 4; ++t) dst[j * 64 + 4 * o + t] = values[4 * j + t];
        }
    }
    return true;
}

// ---- activations ------------------------------------------------------------------------------

// Rows of activations quantised per 32 values: q = round(x / d), d = max|x| / 127 (stored as
// llama.cpp stores it, in half precision), s = d * sum(q) (half precision, for Q4_1's minimums)
// and sum(q) (for the offsets of Q4_0 and Q8_0 values).
struct Quantized {
    int rows = 0, k = 0, blocks = 0;
    std::vector<int8_t> q;       // [rows][k]
    std::vector<float> d, s;     // [rows][blocks]
    std::vector<int32_t> sum;    // [rows][blocks]

    void resize(int rows_, int k_) {
        rows = rows_; k = k_; blocks = k / QK;
        q.resize(size_t(rows) * k); d.resize(size_t(rows) * blocks); s.resize(d.size()); sum.resize(d.size());
    }
    void quantize_row(const float* x, int r);         // row r from x ([k] values)
    void quantize(const float* x, int rows_, int k_);  // every row of x ([rows][k])
};

// One block of 32 values: the scalar definition, and the same arithmetic in AVX-512 registers
// (x * (127 / max|x|) rounded to nearest even, max and integer sums exact): equal results.
void quantize_block(const float* v, int8_t* out, float& d, float& s, int32_t& sum) {
    float amax = 0.f;
    for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float inverse = amax != 0.f ? 127.f / amax : 0.f;
    int total = 0;
    for (int i = 0; i < QK; ++i) {
        out[i] = int8_t(std::nearbyint(v[i] * inverse));
        total += out[i];
    }
    d = round_to_half(amax / 127.f);
    s = round_to_half(amax / 127.f * float(total));
    sum = total;
}

__attribute__((target("avx512f,avx512bw")))
void quantize_block_avx512(const float* v, int8_t* out, float& d, float& s, int32_t& sum) {
    const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __m512 inverse = _mm512_set1_ps(amax != 0.f ? 127.f / amax : 0.f);
    const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512i qa = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(a, inverse), mode));
    const __m512i qb = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(b, inverse), mode));
    _mm_storeu_si128((__m128i*)out, _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128((__m128i*)(out + 16), _mm512_cvtepi32_epi8(qb));
    const int total = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    d = round_to_half(amax / 127.f);
    s = round_to_half(amax / 127.f * float(total));
    sum = total;
}

void Quantized::quantize_row(const float* x, int r) {
    for (int b = 0; b < blocks; ++b) {
        const size_t at = size_t(r) * blocks + b;
        if (g_isa == AVX512) quantize_block_avx512(x + b * QK, &q[size_t(r) * k + b * QK], d[at], s[at], sum[at]);
        else quantize_block(x + b * QK, &q[size_t(r) * k + b * QK], d[at], s[at], sum[at]);
    }
}

void Quantized::quantize(const float* x, int rows_, int k_) {
    resize(rows_, k_);
    for (int r = 0; r < rows; ++r) quantize_row(x + size_t(r) * k, r);
}

// ---- products: y[r][0:n] (+)= x_r . w, rows [r0, r1), groups [g0, g1) --------------------------

// The float update of one block is the same in every path:
//   acc = fma(float(isum), d_w * d_x, acc)   [ then, Q4_1: acc = fma(m_w, s_x, acc) ]
// with isum the block's integer dot product (Q4_0: values - 8, Q8_0: signed values).

template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void tile_avx512(const Matrix& w, const Quantized& x, int r0, int g, float* y, int ldy) {
    // Integer sums split in CH chains per row (vpdpbusd's latency), added at the end: integer
    // addition is exact, so a row's result does not depend on the tile it is in.
    constexpr int CH = R > 4 ? 1 : 2;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0f), flip = _mm512_set1_epi8(char(0x80));
    for (int b = 0; b < w.blocks; ++b) {
        const uint8_t* q = w.q(g, b);
        const size_t s = (size_t(g) * w.blocks + b) * GROUP;
        if (r0 == 0)  // the first tile streams the weights from memory: ask for them ahead
            for (int line = 0; line < w.chunk_bytes; line += 64) _mm_prefetch((const char*)q + PREFETCH * w.chunk_bytes + line, _MM_HINT_T0);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)&w.d[s]));
        __m512i u[8];
        if (w.type == Q8_0) {
            for (int j = 0; j < 8; ++j) u[j] = _mm512_xor_si512(_mm512_loadu_si512(q + 64 * j), flip);  // w + 128
        } else {
            for (int j = 0; j < 4; ++j) {
                const __m512i bytes = _mm512_loadu_si512(q + 64 * j);
                u[j] = _mm512_and_si512(bytes, low);
                u[j + 4] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
            }
        }
        __m512i isum[R][CH];
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < CH; ++c) isum[r][c] = _mm512_setzero_si512();
        for (int j = 0; j < 8; ++j)
            for (int r = 0; r < R; ++r) {
                int32_t four;
                std::memcpy(&four, x.q.data() + size_t(r0 + r) * x.k + b * QK + 4 * j, 4);
                isum[r][j % CH] = _mm512_dpbusd_epi32(isum[r][j % CH], u[j], _mm512_set1_epi32(four));
            }
        const __m512 mw = w.type == Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)&w.m[s])) : dw;
        for (int r = 0; r < R; ++r) {
            const size_t at = size_t(r0 + r) * x.blocks + b;
            __m512i total = isum[r][0];
            for (int c = 1; c < CH; ++c) total = _mm512_add_epi32(total, isum[r][c]);
            if (w.type == Q4_0) total = _mm512_sub_epi32(total, _mm512_set1_epi32(8 * x.sum[at]));
            if (w.type == Q8_0) total = _mm512_sub_epi32(total, _mm512_set1_epi32(128 * x.sum[at]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(dw, _mm512_set1_ps(x.d[at])), acc[r]);
            if (w.type == Q4_1) acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(x.s[at]), acc[r]);
        }
    }
    const int n = std::min(GROUP, w.n - g * GROUP);
    for (int r = 0; r < R; ++r) {
        alignas(64) float out[GROUP];
        _mm512_store_ps(out, acc[r]);
        std::memcpy(y + size_t(r0 + r) * ldy + g * GROUP, out, n * sizeof(float));
    }
}

template <int R>
__attribute__((target("avx2,fma,f16c")))
void tile_avx2(const Matrix& w, const Quantized& x, int r0, int g, float* y, int ldy) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    for (int b = 0; b < w.blocks; ++b) {
        const uint8_t* q = w.q(g, b);
        const size_t s = (size_t(g) * w.blocks + b) * GROUP;
        if (r0 == 0)  // the first tile streams the weights from memory: ask for them ahead
            for (int line = 0; line < w.chunk_bytes; line += 64) _mm_prefetch((const char*)q + PREFETCH * w.chunk_bytes + line, _MM_HINT_T0);
        for (int h = 0; h < 2; ++h) {  // weight rows 8h .. 8h+7
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)&w.d[s + 8 * h]));
            __m256i u[8];
            if (w.type == Q8_0) {
                for (int j = 0; j < 8; ++j) u[j] = _mm256_loadu_si256((const __m256i*)(q + 64 * j + 32 * h));
            } else {
                for (int j = 0; j < 4; ++j) {
                    const __m256i bytes = _mm256_loadu_si256((const __m256i*)(q + 64 * j + 32 * h));
                    u[j] = _mm256_and_si256(bytes, low);
                    u[j + 4] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
                }
            }
            for (int r = 0; r < R; ++r) {
                const size_t at = size_t(r0 + r) * x.blocks + b;
                const int8_t* a = x.q.data() + size_t(r0 + r) * x.k + b * QK;
                __m256i isum;
                if (w.type == Q8_0) {  // |w| times a with w's sign: no 16-bit overflow
                    isum = _mm256_setzero_si256();
                    for (int j = 0; j < 8; ++j) {
                        int32_t four;
                        std::memcpy(&four, a + 4 * j, 4);
                        const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(u[j], u[j]),
                                                                   _mm256_sign_epi8(_mm256_set1_epi32(four), u[j]));
                        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(pairs, ones));
                    }
                } else {  // nibbles (<= 15) times |a| <= 127: eight pair sums fit in 16 bits
                    __m256i pairs = _mm256_setzero_si256();
                    for (int j = 0; j < 8; ++j) {
                        int32_t four;
                        std::memcpy(&four, a + 4 * j, 4);
                        pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(u[j], _mm256_set1_epi32(four)));
                    }
                    isum = _mm256_madd_epi16(pairs, ones);
                    if (w.type == Q4_0) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * x.sum[at]));
                }
                acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, _mm256_set1_ps(x.d[at])),
                                            acc[r][h]);
                if (w.type == Q4_1) {
                    const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)&w.m[s + 8 * h]));
                    acc[r][h] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x.s[at]), acc[r][h]);
                }
            }
        }
    }
    const int n = std::min(GROUP, w.n - g * GROUP);
    for (int r = 0; r < R; ++r) {
        alignas(32) float out[GROUP];
        _mm256_store_ps(out, acc[r][0]);
        _mm256_store_ps(out + 8, acc[r][1]);
        std::memcpy(y + size_t(r0 + r) * ldy + g * GROUP, out, n * sizeof(float));
    }
}

template <int R>
void tile_portable(const Matrix& w, const Quantized& x, int r0, int g, float* y, int ldy) {
    float acc[R][GROUP] = {};
    for (int b = 0; b < w.blocks; ++b) {
        const uint8_t* q = w.q(g, b);
        const size_t s = (size_t(g) * w.blocks + b) * GROUP;
        float dw[GROUP], mw[GROUP];
        for (int o = 0; o < GROUP; ++o) {
            dw[o] = half_to_float(w.d[s + o]);
            mw[o] = w.type == Q4_1 ? half_to_float(w.m[s + o]) : 0.f;
        }
        for (int r = 0; r < R; ++r) {
            const size_t at = size_t(r0 + r) * x.blocks + b;
            const int8_t* a = x.q.data() + size_t(r0 + r) * x.k + b * QK;
            int32_t isum[GROUP] = {};
            if (w.type == Q8_0) {
                for (int i = 0; i < QK; ++i)
                    for (int o = 0; o < GROUP; ++o) isum[o] += int8_t(q[(i / 4) * 64 + 4 * o + i % 4]) * a[i];
            } else {
                for (int i = 0; i < 16; ++i)
                    for (int o = 0; o < GROUP; ++o) {
                        const uint8_t byte = q[(i / 4) * 64 + 4 * o + i % 4];
                        isum[o] += (byte & 15) * a[i] + (byte >> 4) * a[i + 16];
                    }
                if (w.type == Q4_0)
                    for (int o = 0; o < GROUP; ++o) isum[o] -= 8 * x.sum[at];
            }
            for (int o = 0; o < GROUP; ++o) {
                acc[r][o] = std::fma(float(isum[o]), dw[o] * x.d[at], acc[r][o]);
                if (w.type == Q4_1) acc[r][o] = std::fma(mw[o], x.s[at], acc[r][o]);
            }
        }
    }
    const int n = std::min(GROUP, w.n - g * GROUP);
    for (int r = 0; r < R; ++r) std::memcpy(y + size_t(r0 + r) * ldy + g * GROUP, acc[r], n * sizeof(float));
}

// Rows go through tiles of up to T (the accumulators stay in registers); a group's weights are
// read from memory by the first tile and from the L1 cache by the others.
#define DFLASH_KERNEL(name) \
    struct name##_k { template <int R> static void tile(const Matrix& w, const Quantized& x, int r0, int g, float* y, int ldy) { name<R>(w, x, r0, g, y, ldy); } };
DFLASH_KERNEL(tile_avx512)
DFLASH_KERNEL(tile_avx2)
DFLASH_KERNEL(tile_portable)

template <class K, int R>
void tail(const Matrix& w, const Quantized& x, int r0, int g, float* y, int ldy) {  // the last x.rows - r0 < T rows
    if constexpr (R > 0) {
        if (x.rows - r0 == R) K::template tile<R>(w, x, r0, g, y, ldy);
        else tail<K, R - 1>(w, x, r0, g, y, ldy);
    }
}

template <class K, int T>
void group_rows(const Matrix& w, const Quantized& x, int g, float* y, int ldy) {
    int r = 0;
    for (; r + T <= x.rows; r += T) K::template tile<T>(w, x, r, g, y, ldy);
    tail<K, T - 1>(w, x, r, g, y, ldy);
}

// Output columns 16g .. 16g+15 of y [rows][ldy]: the product of every row of x with group g of w.
void matmul_group(const Matrix& w, const Quantized& x, int g, float* y, int ldy) {
    if (g_isa == AVX512) group_rows<tile_avx512_k, 8>(w, x, g, y, ldy);
    else if (g_isa == AVX2) group_rows<tile_avx2_k, 4>(w, x, g, y, ldy);
    else group_rows<tile_portable_k, 4>(w, x, g, y, ldy);
}

// ---- sharing a forward's work between threads ---------------------------------------------------

// A forward is a sequence of phases (a product, the attention, the per-row steps between them),
// each cut into chunks. The calling thread and the pool's workers walk the same phases; a chunk
// is claimed by an atomic counter, and a thread that finds a phase's chunks all claimed waits only
// for the chunks still running, never for the other threads to arrive, and the caller returns as
// soon as the last chunk is done. So a worker the scheduler took away (another program on the
// cores) costs at most the chunk it holds: the caller carries on alone, and the worker, when it
// returns, finds the phases done and skips them. (OpenMP's barriers wait for every thread at
// every phase: one busy core made a step wait a scheduler tick per phase.)
// Which thread runs a chunk never changes the numbers: chunks write disjoint outputs.
constexpr int MAX_THREADS = 16;
constexpr auto SPIN_WAIT = std::chrono::milliseconds(5);  // a worker's busy wait for the next job

struct alignas(64) Counter {  // on a cache line of its own: its thread updates it without sharing
    std::atomic<int> next{0}, done{0};
};

// Per phase and thread: a contiguous share of the phase's chunks. A thread runs its own share in
// order (the weights stream through it as with a static split), then takes what is left of the
// others' shares; a phase is done when every share's chunks are.
struct Phases {
    std::unique_ptr<Counter[]> counters;
    int capacity = 0, threads = 1;

    void reset(int n, int threads_) {
        threads = threads_;
        if (n * threads > capacity) {
            counters.reset(new Counter[n * threads]);
            capacity = n * threads;
        }
        for (int i = 0; i < n * threads; ++i) {
            counters[i].next.store(0, std::memory_order_relaxed);
            counters[i].done.store(0, std::memory_order_relaxed);
        }
    }
};

struct Walker {  // one thread's walk through the phases
    Phases& phases;
    int rank = 0;  // 0: the caller; workers 1, 2, ...
    int at = 0;

    template <class F>
    void run(int chunks, F&& chunk) {
        const int id = at++, T = phases.threads;
        Counter* share = &phases.counters[id * T];
        auto start = [&](int t) { return int(int64_t(chunks) * t / T); };
        for (int k = 0; k < T; ++k) {  // its own share first, then the others'
            const int t = (rank + k) % T, first = start(t), size = start(t + 1) - first;
            for (int i; (i = share[t].next.fetch_add(1, std::memory_order_relaxed)) < size;) {
                chunk(first + i);
                share[t].done.fetch_add(1, std::memory_order_release);
            }
        }
        for (int t = 0; t < T; ++t)
            for (int spins = 0; share[t].done.load(std::memory_order_acquire) < start(t + 1) - start(t); ++spins) {
                _mm_pause();
                if (spins > 2000) sched_yield();  // the chunk's thread may be waiting for this core
            }
    }
};

// A piece of work the pool shares: `walk` is run by the caller and by every worker that sees it
// in time; it must only touch shared state through claimed chunks (a late worker may walk a job
// whose caller has long returned: the job, not the caller's stack, holds what it reads).
struct Job {
    Phases phases;
    virtual void walk(int rank) = 0;  // rank 0: the caller
    virtual ~Job() = default;
};

class Pool {
  public:
    static Pool& get() {
        static Pool* pool = new Pool();  // never destroyed: its threads live as long as the process
        return *pool;
    }

    void set_threads(int n) {
        std::lock_guard<std::mutex> lock(mu_);
        while (int(workers_) + 1 < n) {
            std::thread(&Pool::work, this).detach();
            ++workers_;
        }
        active_ = std::max(1, std::min(n, MAX_THREADS));
    }

    int threads() const { return active_; }

    // Before freeing what jobs read (a model): no worker walks an old job any more.
    void quiesce() {
        {
            std::lock_guard<std::mutex> lock(mu_);
            current_.reset();
        }
        while (walking_.load(std::memory_order_acquire) > 0) sched_yield();
    }

    void run(const std::shared_ptr<Job>& job) {
        if (active_ > 1) {
            {
                std::lock_guard<std::mutex> lock(mu_);
                current_ = job;
                epoch_.fetch_add(1, std::memory_order_release);
            }
            wake_.notify_all();
        }
        job->walk(0);
    }

  private:
    void work() {
        uint64_t seen = epoch_.load(std::memory_order_acquire);
        const int id = int(started_.fetch_add(1)) + 1;  // this worker's rank: only the first active - 1 work
        for (;;) {
            // wait for a new job: spin for up to SPIN_WAIT (steps come in quick succession, a
            // draft pass of a millisecond or two between them), then sleep. (Yielding the core
            // instead, measured on the 2-core VM, made the next step ~1.7 ms slower.)
            const auto since = std::chrono::steady_clock::now();
            for (int spins = 0; epoch_.load(std::memory_order_acquire) == seen; ++spins) {
                _mm_pause();
                if ((spins & 255) == 255 && std::chrono::steady_clock::now() - since > SPIN_WAIT) {
                    std::unique_lock<std::mutex> lock(mu_);
                    wake_.wait(lock, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
                }
            }
            std::shared_ptr<Job> job;
            {
                std::lock_guard<std::mutex> lock(mu_);
                seen = epoch_.load(std::memory_order_acquire);
                if (id < active_) job = current_;
                if (job) walking_.fetch_add(1);
            }
            if (job) {
                job->walk(id);
                walking_.fetch_sub(1, std::memory_order_release);
            }
        }
    }

    std::mutex mu_;
    std::condition_variable wake_;
    std::atomic<uint64_t> epoch_{0};
    std::atomic<unsigned> started_{0};
    std::shared_ptr<Job> current_;
    unsigned workers_ = 0;
    std::atomic<int> active_{1};
    std::atomic<int> walking_{0};
};

// y [rows][ldy]: every row of x times w, as a phase of chunks of a few groups (~64 chunks).
void matmul(Walker& walk, const Matrix& w, const Quantized& x, float* y, int ldy) {
    const int per = std::max(1, w.groups / 64);
    walk.run((w.groups + per - 1) / per, [&](int i) {
        for (int g = i * per; g < std::min(w.groups, (i + 1) * per); ++g) matmul_group(w, x, g, y, ldy);
    });
}

// ---- the model --------------------------------------------------------------------------------

struct Linear {  // one or more matrices side by side in the output (q|k|v, gate|up)
    std::vector<Matrix> parts;
    int n = 0, k = 0;
    void forward(Walker& walk, const Quantized& x, float* y) const {  // y: [rows][n], one phase per part
        int offset = 0;
        for (const Matrix& part : parts) {
            matmul(walk, part, x, y + offset, n);
            offset += part.n;
        }
    }
};

struct Layer {
    Linear qkv, o, gate_up, down;
    std::vector<float> attn_norm, ffn_norm, q_norm, k_norm, qkv_bias;
};

struct Config {
    int32_t layers, hidden, heads, kv_heads, head_dim, ffn, vocab, neox_rope;
    float eps;
    double rope_base;
};

struct Sequence {
    int length = 0, capacity = 0;
    std::vector<float> k, v;  // per layer, kv head: keys [head_dim][capacity], values [capacity][head_dim]
};

struct Model {
    Config c;
    std::vector<Layer> layers;
    std::vector<float> out_norm;
    Linear head;
    Linear fc;                       // a drafter's: target features -> its width (dfl_draft)
    std::vector<float> fc_norm;      // and the norm after it
    int embed_type = -1;
    std::vector<uint8_t> embedding;  // the GGUF's token_embd rows as stored
    std::vector<float> cos_table, sin_table;  // [positions][head_dim / 2]
    int table_positions = 0;
    // scratch, reused between calls
    std::vector<float> x, xn, qkv, att, gu, act, logits_all, ctx;
    Quantized quant_h, quant_att, quant_ffn, quant_head;  // activations entering the products
    Quantized quant_fc, quant_kv;  // a drafter's: features into fc, [context ; block] into q|k|v
    std::vector<int> row_seq, row_pos;
};

// exp by a degree-6 polynomial on [-ln2/2, ln2/2] times a power of two (relative error ~2e-7),
// in vector registers: SiLU and softmax use it, the same function for every row.
__attribute__((target("avx512f")))
inline __m512 exp_avx512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(87.f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x));
    const float c[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
    __m512 p = _mm512_set1_ps(c[0]);
    for (int j = 1; j < 7; ++j) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[j]));
    return _mm512_scalef_ps(p, k);
}

__attribute__((target("avx2,fma")))
inline __m256 exp_avx2(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(87.f));
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x));
    const float c[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
    __m256 p = _mm256_set1_ps(c[0]);
    for (int j = 1; j < 7; ++j) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c[j]));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// The first largest of n logits and its softmax probability, 1 / sum(exp(l - max)): a drafter's
// best token and its confidence without a softmax over the row.
__attribute__((target("avx512f")))
float exp_sum_avx512(const float* v, int n, float top) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_add_ps(acc, exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(v + i), _mm512_set1_ps(top))));
    float total = _mm512_reduce_add_ps(acc);
    for (; i < n; ++i) total += std::exp(v[i] - top);
    return total;
}

__attribute__((target("avx2,fma")))
float exp_sum_avx2(const float* v, int n, float top) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(v + i), _mm256_set1_ps(top))));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    float total = 0.f;
    for (float lane : lanes) total += lane;
    for (; i < n; ++i) total += std::exp(v[i] - top);
    return total;
}

void best_and_probability(const float* v, int n, int64_t& best, float& probability) {
    best = std::max_element(v, v + n) - v;  // the first of equal maxima, as torch
    const float top = v[best];
    float total;
    if (g_isa == AVX512) total = exp_sum_avx512(v, n, top);
    else if (g_isa >= AVX2) total = exp_sum_avx2(v, n, top);
    else {
        total = 0.f;
        for (int i = 0; i < n; ++i) total += std::exp(v[i] - top);
    }
    probability = 1.0f / total;
}

// SiLU(gate) * up over n values (n a multiple of the vector width; silu_mul checks).
__attribute__((target("avx512f")))
void silu_mul_avx512(const float* gate, const float* up, float* out, int n) {
    for (int i = 0; i < n; i += 16) {
        const __m512 g = _mm512_loadu_ps(gate + i), e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), _mm512_loadu_ps(up + i)));
    }
}

__attribute__((target("avx2,fma")))
void silu_mul_avx2(const float* gate, const float* up, float* out, int n) {
    for (int i = 0; i < n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i), e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)), _mm256_loadu_ps(up + i)));
    }
}

void silu_mul(const float* gate, const float* up, float* out, int n) {
    if (g_isa == AVX512 && n % 16 == 0) silu_mul_avx512(gate, up, out, n);
    else if (g_isa >= AVX2 && n % 8 == 0) silu_mul_avx2(gate, up, out, n);
    else for (int i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void rms_norm(const float* x, const float* weight, float* y, int n, float eps) {
    double total = 0.0;  // ggml sums squares in double
    for (int i = 0; i < n; ++i) total += double(x[i]) * x[i];
    const float scale = 1.0f / std::sqrt(float(total / n) + eps);
    for (int i = 0; i < n; ++i) y[i] = (x[i] * scale) * weight[i];
}

void ensure_rope(Model& m, int positions) {
    if (positions <= m.table_positions) return;
    const int half = m.c.head_dim / 2, total = std::max(positions, 2 * m.table_positions + 256);
    m.cos_table.resize(size_t(total) * half);
    m.sin_table.resize(size_t(total) * half);
    for (int p = m.table_positions; p < total; ++p)
        for (int i = 0; i < half; ++i) {
            const double theta = p * std::pow(m.c.rope_base, -2.0 * i / m.c.head_dim);
            m.cos_table[size_t(p) * half + i] = float(std::cos(theta));
            m.sin_table[size_t(p) * half + i] = float(std::sin(theta));
        }
    m.table_positions = total;
}

void rope(const Model& m, float* v, int pos) {
    const int half = m.c.head_dim / 2;
    const float* cs = &m.cos_table[size_t(pos) * half];
    const float* sn = &m.sin_table[size_t(pos) * half];
    for (int i = 0; i < half; ++i) {
        float& a = m.c.neox_rope ? v[i] : v[2 * i];
        float& b = m.c.neox_rope ? v[i + half] : v[2 * i + 1];
        const float x0 = a, x1 = b;
        a = x0 * cs[i] - x1 * sn[i];
        b = x0 * sn[i] + x1 * cs[i];
    }
}

void reserve(const Model& m, Sequence& s, int needed) {
    if (needed <= s.capacity) return;
    const int cap = std::max(needed, 2 * s.capacity);
    const int d = m.c.head_dim, heads = m.c.layers * m.c.kv_heads;
    std::vector<float> k(size_t(heads) * d * cap), v(size_t(heads) * cap * d);
    for (int h = 0; h < heads; ++h) {
        for (int i = 0; i < d; ++i)
            std::memcpy(&k[(size_t(h) * d + i) * cap], &s.k[(size_t(h) * d + i) * s.capacity], s.length * sizeof(float));
        std::memcpy(&v[size_t(h) * cap * d], &s.v[size_t(h) * s.capacity * d], size_t(s.length) * d * sizeof(float));
    }
    s.k.swap(k); s.v.swap(v); s.capacity = cap;
}

// The dot products of one query with keys 0..n-1 ([head_dim][capacity] layout: positions in
// lanes, the head dimension summed in order) and the value sum over those positions. Each
// position's score and each output value see the same operations whatever n is.
__attribute__((target("avx512f")))
void attend_avx512(const float* q, const float* keys, const float* values, int n, int cap, int d, float scale,
                   float* scores, float* out) {
    int t = 0;
    for (; t + 16 <= n; t += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < d; ++i) acc = _mm512_fmadd_ps(_mm512_set1_ps(q[i]), _mm512_loadu_ps(keys + size_t(i) * cap + t), acc);
        _mm512_storeu_ps(scores + t, _mm512_mul_ps(acc, _mm512_set1_ps(scale)));
    }
    for (; t < n; ++t) {
        float acc = 0.f;
        for (int i = 0; i < d; ++i) acc = std::fma(q[i], keys[size_t(i) * cap + t], acc);
        scores[t] = acc * scale;
    }
    float top = scores[0];
    for (t = 1; t < n; ++t) top = std::max(top, scores[t]);
    for (t = 0; t < n; t += 16) {  // (scores has room for a padded last chunk)
        const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(scores + t), _mm512_set1_ps(top)));
        _mm512_storeu_ps(scores + t, e);
    }
    float total = 0.f;
    for (t = 0; t < n; ++t) total += scores[t];
    for (int i = 0; i < d; i += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (t = 0; t < n; ++t) acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[t]), _mm512_loadu_ps(values + size_t(t) * d + i), acc);
        _mm512_storeu_ps(out + i, _mm512_div_ps(acc, _mm512_set1_ps(total)));
    }
}

__attribute__((target("avx2,fma")))
void attend_avx2(const float* q, const float* keys, const float* values, int n, int cap, int d, float scale,
                 float* scores, float* out) {
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int i = 0; i < d; ++i) acc = _mm256_fmadd_ps(_mm256_set1_ps(q[i]), _mm256_loadu_ps(keys + size_t(i) * cap + t), acc);
        _mm256_storeu_ps(scores + t, _mm256_mul_ps(acc, _mm256_set1_ps(scale)));
    }
    for (; t < n; ++t) {
        float acc = 0.f;
        for (int i = 0; i < d; ++i) acc = std::fma(q[i], keys[size_t(i) * cap + t], acc);
        scores[t] = acc * scale;
    }
    float top = scores[0];
    for (t = 1; t < n; ++t) top = std::max(top, scores[t]);
    for (t = 0; t < n; t += 8) {  // (scores has room for a padded last chunk)
        const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(top)));
        _mm256_storeu_ps(scores + t, e);
    }
    float total = 0.f;
    for (t = 0; t < n; ++t) total += scores[t];
    for (int i = 0; i < d; i += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (t = 0; t < n; ++t) acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[t]), _mm256_loadu_ps(values + size_t(t) * d + i), acc);
        _mm256_storeu_ps(out + i, _mm256_div_ps(acc, _mm256_set1_ps(total)));
    }
}

void attend_portable(const float* q, const float* keys, const float* values, int n, int cap, int d, float scale,
                     float* scores, float* out) {
    for (int t = 0; t < n; ++t) {
        float acc = 0.f;
        for (int i = 0; i < d; ++i) acc = std::fma(q[i], keys[size_t(i) * cap + t], acc);
        scores[t] = acc * scale;
    }
    float top = scores[0];
    for (int t = 1; t < n; ++t) top = std::max(top, scores[t]);
    float total = 0.f;
    for (int t = 0; t < n; ++t) { scores[t] = std::exp(scores[t] - top); total += scores[t]; }
    for (int i = 0; i < d; ++i) {
        float acc = 0.f;
        for (int t = 0; t < n; ++t) acc = std::fma(scores[t], values[size_t(t) * d + i], acc);
        out[i] = acc / total;
    }
}

// One row's q|k|v after its product: bias, q/k norms and rotary at `pos`; its key and value go into
// `s` at `pos` (layer li).
void place_qkv(const Model& m, const Layer& l, int li, float* v, Sequence* s, int pos) {
    const Config& c = m.c;
    const int hd = c.head_dim, q_dim = c.heads * hd, kv_dim = c.kv_heads * hd;
    if (!l.qkv_bias.empty())
        for (int i = 0; i < q_dim + 2 * kv_dim; ++i) v[i] += l.qkv_bias[i];
    for (int h = 0; h < c.heads + c.kv_heads; ++h) {
        float* one = v + h * hd;
        const std::vector<float>& norm = h < c.heads ? l.q_norm : l.k_norm;
        if (!norm.empty()) rms_norm(one, norm.data(), one, hd, c.eps);
        rope(m, one, pos);
    }
    for (int h = 0; h < c.kv_heads; ++h) {
        const size_t base = size_t(li * c.kv_heads + h);
        for (int i = 0; i < hd; ++i) s->k[(base * hd + i) * s->capacity + pos] = v[q_dim + h * hd + i];
        std::memcpy(&s->v[(base * s->capacity + pos) * hd], v + q_dim + kv_dim + h * hd, hd * sizeof(float));
    }
}

// Query head h of layer li over keys 0..n-1 of `s`, through the kernel path in force.
void attend(const Model& m, int li, int h, const float* q, const Sequence& s, int n, float* scores, float* out) {
    const Config& c = m.c;
    const int hd = c.head_dim;
    const float scale = 1.0f / std::sqrt(float(hd));
    const size_t base = size_t(li * c.kv_heads + h / (c.heads / c.kv_heads));
    const float* keys = &s.k[base * hd * s.capacity];
    const float* values = &s.v[base * s.capacity * hd];
    if (g_isa == AVX512 && hd % 16 == 0) attend_avx512(q, keys, values, n, s.capacity, hd, scale, scores, out);
    else if (g_isa >= AVX2 && hd % 8 == 0) attend_avx2(q, keys, values, n, s.capacity, hd, scale, scores, out);
    else attend_portable(q, keys, values, n, s.capacity, hd, scale, scores, out);
}

void dequantize_row(int type, const uint8_t* row, int k, float* out) {
    const int bb = block_bytes(type);
    for (int b = 0; b < k / QK; ++b) {
        const uint8_t* src = row + size_t(b) * bb;
        uint16_t dh;
        std::memcpy(&dh, src, 2);
        const float d = half_to_float(dh);
        float* y = out + b * QK;
        if (type == Q8_0) {
            for (int i = 0; i < QK; ++i) y[i] = d * float(int8_t(src[2 + i]));
        } else if (type == Q4_0) {
            for (int i = 0; i < 16; ++i) {
                y[i] = d * float((src[2 + i] & 15) - 8);
                y[i + 16] = d * float((src[2 + i] >> 4) - 8);
            }
        } else {  // Q4_1
            uint16_t mh;
            std::memcpy(&mh, src + 2, 2);
            const float mn = half_to_float(mh);
            for (int i = 0; i < 16; ++i) {
                y[i] = d * float(src[4 + i] & 15) + mn;
                y[i + 16] = d * float(src[4 + i] >> 4) + mn;
            }
        }
    }
}

void embed_rows(const Model& m, int n, const int64_t* tokens, float* out) {
    const int k = m.c.hidden;
    const size_t row_bytes = size_t(k / QK) * block_bytes(m.embed_type);
    for (int r = 0; r < n; ++r) {
        if (m.embed_type == F32)
            std::memcpy(out + size_t(r) * k, m.embedding.data() + size_t(tokens[r]) * k * 4, k * sizeof(float));
        else
            dequantize_row(m.embed_type, m.embedding.data() + size_t(tokens[r]) * row_bytes, k, out + size_t(r) * k);
    }
}

Linear* linear_of(Model& m, int layer, int which) {
    if (which == 4) return &m.head;
    if (which == 5) return &m.fc;
    if (layer < 0 || layer >= m.c.layers) return nullptr;
    Layer& l = m.layers[layer];
    switch (which) {
        case 0: return &l.qkv;
        case 1: return &l.o;
        case 2: return &l.gate_up;
        case 3: return &l.down;
    }
    return nullptr;
}

// A layer after its attention, for `rows` rows: the output product (m.att -> m.xn), the residual
// into m.x, the feed-forward norm and SwiGLU; the feed-forward output is left in m.xn for the
// next layer (or the final norm) to add to the residual.
void after_attention(Walker& walk, Model& m, const Layer& l, int rows) {
    const int H = m.c.hidden, F = m.c.ffn, q_dim = m.c.heads * m.c.head_dim;
    walk.run(rows, [&](int r) { m.quant_att.quantize_row(&m.att[size_t(r) * q_dim], r); });
    l.o.forward(walk, m.quant_att, m.xn.data());
    walk.run(rows, [&](int r) {
        float* x = &m.x[size_t(r) * H];
        for (int i = 0; i < H; ++i) x[i] += m.xn[size_t(r) * H + i];
        rms_norm(x, l.ffn_norm.data(), &m.xn[size_t(r) * H], H, m.c.eps);
        m.quant_h.quantize_row(&m.xn[size_t(r) * H], r);
    });
    l.gate_up.forward(walk, m.quant_h, m.gu.data());
    walk.run(rows, [&](int r) {
        float* gate = &m.gu[size_t(r) * 2 * F];
        silu_mul(gate, gate + F, &m.act[size_t(r) * F], F);
        m.quant_ffn.quantize_row(&m.act[size_t(r) * F], r);
    });
    l.down.forward(walk, m.quant_ffn, m.xn.data());
}

// One forward (dfl_forward's arguments and what follows from them), walked by the caller and
// the pool's workers.
struct Forward : Job {
    Model* model;
    std::vector<void*> seqs;
    const int64_t* tokens;
    float *logits, *features;
    int64_t* argmax;
    const int* feat_layers;
    int n_seqs, per_seq, head, n_feat, rows, head_rows, max_len;

    void feature(int li, int r, const float* v) const {  // the hidden state after layer li, if asked for
        for (int f = 0; f < n_feat; ++f)
            if (feat_layers[f] == li) std::memcpy(features + (size_t(r) * n_feat + f) * model->c.hidden, v,
                                                  model->c.hidden * sizeof(float));
    }

    void walk(int rank) override {
        Model& m = *model;
        const Config& c = m.c;
        const int hd = c.head_dim, q_dim = c.heads * hd, kv_dim = c.kv_heads * hd;
        const int qkv_dim = q_dim + 2 * kv_dim, H = c.hidden;
        Walker walk{phases, rank};
        std::vector<float> scores(max_len + 16);
        walk.run(rows, [&](int r) { embed_rows(m, 1, tokens + r, &m.x[size_t(r) * H]); });
        for (int li = 0; li < c.layers; ++li) {
            const Layer& l = m.layers[li];
            walk.run(rows, [&](int r) {  // (the previous layer's feed-forward output joins the residual here)
                float* x = &m.x[size_t(r) * H];
                if (li > 0) {
                    for (int i = 0; i < H; ++i) x[i] += m.xn[size_t(r) * H + i];
                    if (li - 1 != c.layers - 1) feature(li - 1, r, x);
                }
                rms_norm(x, l.attn_norm.data(), &m.xn[size_t(r) * H], H, c.eps);
                m.quant_h.quantize_row(&m.xn[size_t(r) * H], r);
            });
            l.qkv.forward(walk, m.quant_h, m.qkv.data());
            walk.run(rows, [&](int r) {
                place_qkv(m, l, li, &m.qkv[size_t(r) * qkv_dim], static_cast<Sequence*>(seqs[m.row_seq[r]]), m.row_pos[r]);
            });
            walk.run(rows * c.heads, [&](int i) {  // each row attends over its sequence up to itself
                const int r = i / c.heads, h = i % c.heads;
                attend(m, li, h, &m.qkv[size_t(r) * qkv_dim + h * hd], *static_cast<Sequence*>(seqs[m.row_seq[r]]),
                       m.row_pos[r] + 1, scores.data(), &m.att[size_t(r) * q_dim + h * hd]);
            });
            after_attention(walk, m, l, rows);
        }
        walk.run(rows, [&](int r) {  // the last residual, the final norm; the rows the head reads
            float* x = &m.x[size_t(r) * H];
            for (int i = 0; i < H; ++i) x[i] += m.xn[size_t(r) * H + i];
            rms_norm(x, m.out_norm.data(), &m.xn[size_t(r) * H], H, c.eps);
            feature(c.layers - 1, r, &m.xn[size_t(r) * H]);  // (reported after the final norm, as transformers does)
            const int slot = head == 2 ? r : head == 1 && r % per_seq == per_seq - 1 ? r / per_seq : -1;
            if (slot >= 0) m.quant_head.quantize_row(&m.xn[size_t(r) * H], slot);
        });
        if (head_rows > 0) {
            m.head.forward(walk, m.quant_head, logits);
            walk.run(head_rows, [&](int r) {
                const float* row = logits + size_t(r) * c.vocab;
                argmax[r] = std::max_element(row, row + c.vocab) - row;  // the first of equal maxima, as torch
            });
        }
    }
};


// One draft pass of a DFlash drafter (a Model holding the drafter's layers, `fc` and `fc_norm`)
// for several sequences, each with its own draft cache. Per sequence: its new context rows
// (target features, fused by fc + fc_norm) and a block of `block` embedded tokens. In every layer
// the keys and values are [cached context ; new context ; block]: the context rows enter the
// key/value products as they are (no layer norm), the block rows after the layer's input norm,
// and the block's queries see every one of them (no causal mask). The new context's keys and
// values stay in the cache (its length grows by them); the block's are written after them and
// overwritten by the next pass. `out`: the block rows after the final norm. With a head (the
// target's rows of the draft vocabulary), rows first .. first + count - 1 of each block go
// through it: their logits, best column and its probability.
struct DraftForward : Job {
    Model* model;
    const Matrix* head;
    float *logits, *top;
    int64_t* best;
    int first, count;
    std::vector<Sequence*> seqs;
    std::vector<int> ctx_first, ctx_count;  // per sequence: its first row of `features`, how many
    const float *features, *embeds;
    float* out;
    int n_seqs, block, ctx_rows, max_len;

    void walk(int rank) override {
        Model& m = *model;
        const Config& c = m.c;
        const int hd = c.head_dim, q_dim = c.heads * hd, qkv_dim = q_dim + 2 * c.kv_heads * hd;
        const int H = c.hidden, block_rows = n_seqs * block, rows = ctx_rows + block_rows;
        Walker walk{phases, rank};
        std::vector<float> scores(max_len + 16);
        // rows 0 .. ctx_rows-1: new context, then the block rows; where each sits in its sequence
        auto seq_of = [&](int r) {
            if (r >= ctx_rows) return (r - ctx_rows) / block;
            int i = 0;
            while (ctx_first[i] + ctx_count[i] <= r) ++i;
            return i;
        };
        auto pos_of = [&](int r) {
            const int i = seq_of(r), base = seqs[i]->length;
            return r < ctx_rows ? base + r - ctx_first[i] : base + ctx_count[i] + (r - ctx_rows) % block;
        };
        if (ctx_rows > 0) {
            walk.run(ctx_rows, [&](int r) { m.quant_fc.quantize_row(features + size_t(r) * m.fc.k, r); });
            m.fc.forward(walk, m.quant_fc, m.ctx.data());
            walk.run(ctx_rows, [&](int r) {
                float* v = &m.ctx[size_t(r) * H];
                rms_norm(v, m.fc_norm.data(), v, H, c.eps);
            });
        }
        walk.run(block_rows, [&](int b) { std::memcpy(&m.x[size_t(b) * H], embeds + size_t(b) * H, H * sizeof(float)); });
        for (int li = 0; li < c.layers; ++li) {
            const Layer& l = m.layers[li];
            walk.run(rows, [&](int r) {  // the key/value inputs: context as it is, block rows normed
                if (r < ctx_rows) {
                    m.quant_kv.quantize_row(&m.ctx[size_t(r) * H], r);
                } else {
                    const size_t b = size_t(r - ctx_rows) * H;
                    if (li > 0)
                        for (int i = 0; i < H; ++i) m.x[b + i] += m.xn[b + i];
                    rms_norm(&m.x[b], l.attn_norm.data(), &m.xn[b], H, c.eps);
                    m.quant_kv.quantize_row(&m.xn[b], r);
                }
            });
            l.qkv.forward(walk, m.quant_kv, m.qkv.data());
            walk.run(rows, [&](int r) { place_qkv(m, l, li, &m.qkv[size_t(r) * qkv_dim], seqs[seq_of(r)], pos_of(r)); });
            walk.run(block_rows * c.heads, [&](int i) {  // every block row sees the whole context and block
                const int b = i / c.heads, h = i % c.heads, seq = b / block;
                attend(m, li, h, &m.qkv[size_t(ctx_rows + b) * qkv_dim + h * hd], *seqs[seq],
                       seqs[seq]->length + ctx_count[seq] + block, scores.data(), &m.att[size_t(b) * q_dim + h * hd]);
            });
            after_attention(walk, m, l, block_rows);
        }
        walk.run(block_rows, [&](int b) {
            float* x = &m.x[size_t(b) * H];
            for (int i = 0; i < H; ++i) x[i] += m.xn[size_t(b) * H + i];
            rms_norm(x, m.out_norm.data(), out + size_t(b) * H, H, c.eps);
            const int j = b % block - first;
            if (head && j >= 0 && j < count) m.quant_head.quantize_row(out + size_t(b) * H, b / block * count + j);
        });
        if (head) {
            matmul(walk, *head, m.quant_head, logits, head->n);
            walk.run(n_seqs * count, [&](int r) {
                best_and_probability(logits + size_t(r) * head->n, head->n, best[r], top[r]);
            });
        }
    }
};

}  // namespace

extern "C" {

int dfl_isa_detect() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
        return AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return AVX2;
    return PORTABLE;
}

// Choose the kernel path; one the CPU lacks is refused (returns the path in force).
int dfl_set_isa(int isa) {
    if (isa >= PORTABLE && isa <= dfl_isa_detect()) g_isa = isa;
    return g_isa;
}

// One GGUF matrix of `type` ([n][k / 32] blocks, copied) as a linear layer of its own: the
// drafter's rows of the LM head run through it, with the target's numbers.
void* dfl_linear_new(int type, const void* data, int n, int k) {
    auto* w = new Matrix();
    if (!repack(*w, type, static_cast<const uint8_t*>(data), n, k)) {
        delete w;
        return nullptr;
    }
    return w;
}


// y [rows][n] = x [rows][k] times the matrix, through the kernel path in force.
void dfl_linear(void* linear, const float* x, int rows, float* y) {
    struct Product : Job {
        const Matrix* w;
        Quantized q;
        float* y;
        void walk(int rank) override {
            Walker walk{phases, rank};
            matmul(walk, *w, q, y, w->n);
        }
    };
    auto job = std::make_shared<Product>();
    job->w = static_cast<Matrix*>(linear);
    job->q.quantize(x, rows, job->w->k);
    job->y = y;
    job->phases.reset(1, Pool::get().threads());
    Pool::get().run(job);
}

void* dfl_model_new(const Config* config) {
    auto* m = new Model();
    m->c = *config;
    m->layers.resize(config->layers);
    return m;
}

void dfl_model_free(void* model) {
    Pool::get().quiesce();
    delete static_cast<Model*>(model);
}

void dfl_linear_free(void* linear) {
    Pool::get().quiesce();
    delete static_cast<Matrix*>(linear);
}

// Threads that share a step (the caller and n - 1 workers of the pool).
void dfl_set_threads(int n) { Pool::get().set_threads(std::max(1, n)); }

// A linear layer from `parts` GGUF matrices placed side by side in its output (q|k|v).
// which: 0 qkv, 1 attention output, 2 gate|up, 3 down, 4 LM head, 5 a drafter's fc (layer ignored).
int dfl_set_linear(void* model, int layer, int which, int parts, const int* types, const void* const* data,
                   const int* rows, int k) {
    Linear* lin = linear_of(*static_cast<Model*>(model), layer, which);
    if (!lin) return -1;
    lin->parts.assign(parts, Matrix());
    lin->n = 0;
    lin->k = k;
    for (int i = 0; i < parts; ++i) {
        if (!repack(lin->parts[i], types[i], static_cast<const uint8_t*>(data[i]), rows[i], k)) return -2;
        lin->n += rows[i];
    }
    return 0;
}

// which: 0 attention norm, 1 ffn norm, 2 q norm, 3 k norm, 4 q|k|v bias, 5 output norm, 6 a drafter's
// norm after fc (5 and 6: layer ignored)
int dfl_set_vector(void* model, int layer, int which, const float* data, int n) {
    Model& m = *static_cast<Model*>(model);
    std::vector<float> v(data, data + n);
    if (which == 5) { m.out_norm.swap(v); return 0; }
    if (which == 6) { m.fc_norm.swap(v); return 0; }
    if (layer < 0 || layer >= m.c.layers) return -1;
    Layer& l = m.layers[layer];
    switch (which) {
        case 0: l.attn_norm.swap(v); return 0;
        case 1: l.ffn_norm.swap(v); return 0;
        case 2: l.q_norm.swap(v); return 0;
        case 3: l.k_norm.swap(v); return 0;
        case 4: l.qkv_bias.swap(v); return 0;
    }
    return -1;
}

int dfl_set_embedding(void* model, int type, const void* data, int vocab, int hidden) {
    Model& m = *static_cast<Model*>(model);
    const size_t bytes = type == F32 ? size_t(vocab) * hidden * 4 : size_t(vocab) * (hidden / QK) * block_bytes(type);
    if (type != F32 && block_bytes(type) == 0) return -2;
    m.embed_type = type;
    m.embedding.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + bytes);
    return 0;
}

void dfl_embed(void* model, int n, const int64_t* tokens, float* out) {
    embed_rows(*static_cast<Model*>(model), n, tokens, out);
}

void* dfl_seq_new() { return new Sequence(); }
void dfl_seq_free(void* seq) { delete static_cast<Sequence*>(seq); }
int dfl_seq_length(void* seq) { return static_cast<Sequence*>(seq)->length; }
void dfl_seq_set_length(void* seq, int length) {
    auto* s = static_cast<Sequence*>(seq);
    s->length = std::max(0, std::min(length, s->length));
}

// Run `per_seq` tokens after each of `n_seqs` sequences' cached ones (tokens: [n_seqs][per_seq]),
// appending them to the caches. head: 0 no logits, 1 the last row of each sequence, 2 every
// row; logits [rows with a head][vocab], argmax [same]. features: [n_seqs * per_seq][n_feat *
// hidden], the hidden states after each layer in feat_layers (the last layer's after the final
// norm, as transformers reports it). Returns 0, or a negative code for bad arguments.
int dfl_forward(void* model, int n_seqs, void* const* seqs, int per_seq, const int64_t* tokens, int head,
                float* logits, int64_t* argmax, int n_feat, const int* feat_layers, float* features) {
    Model& m = *static_cast<Model*>(model);
    const Config& c = m.c;
    const int rows = n_seqs * per_seq, q_dim = c.heads * c.head_dim, qkv_dim = q_dim + 2 * c.kv_heads * c.head_dim;
    const int H = c.hidden, F = c.ffn;
    if (rows <= 0) return -1;
    // sizes, caches and tables first, on this thread; then the pool walks the phases
    auto job = std::make_shared<Forward>();
    job->max_len = 0;
    for (int i = 0; i < n_seqs; ++i) {
        auto* s = static_cast<Sequence*>(seqs[i]);
        reserve(m, *s, s->length + per_seq);
        job->max_len = std::max(job->max_len, s->length + per_seq);
    }
    ensure_rope(m, job->max_len);
    m.x.resize(size_t(rows) * H); m.xn.resize(size_t(rows) * H);
    m.qkv.resize(size_t(rows) * qkv_dim); m.att.resize(size_t(rows) * q_dim);
    m.gu.resize(size_t(rows) * 2 * F); m.act.resize(size_t(rows) * F);
    m.row_seq.resize(rows); m.row_pos.resize(rows);
    for (int r = 0; r < rows; ++r) {
        m.row_seq[r] = r / per_seq;
        m.row_pos[r] = static_cast<Sequence*>(seqs[r / per_seq])->length + r % per_seq;
    }
    const int head_rows = head == 0 ? 0 : head == 1 ? n_seqs : rows;
    m.quant_h.resize(rows, H); m.quant_att.resize(rows, q_dim); m.quant_ffn.resize(rows, F);
    m.quant_head.resize(head_rows, H);
    int phases = 4 + int(m.head.parts.size());
    for (const Layer& l : m.layers)
        phases += 6 + int(l.qkv.parts.size() + l.o.parts.size() + l.gate_up.parts.size() + l.down.parts.size());
    job->phases.reset(phases, Pool::get().threads());
    job->model = &m;
    job->seqs.assign(seqs, seqs + n_seqs);
    job->tokens = tokens; job->logits = logits; job->features = features; job->argmax = argmax;
    job->feat_layers = feat_layers;
    job->n_seqs = n_seqs; job->per_seq = per_seq; job->head = head; job->n_feat = n_feat;
    job->rows = rows; job->head_rows = head_rows;
    Pool::get().run(job);
    for (int i = 0; i < n_seqs; ++i) static_cast<Sequence*>(seqs[i])->length += per_seq;
    return 0;
}


// A drafter's pass (DraftForward): `n_seqs` sequences (draft caches), sequence i with ctx[i] new
// context rows (features: all sequences' rows in order, [sum ctx][fc width]) and `block`
// embedded tokens (embeds: [n_seqs * block][hidden]); out: [n_seqs * block][hidden]. head (a
// dfl_linear_new matrix, or null): logits [n_seqs * count][its rows] of block rows first ..
// first + count - 1, best [n_seqs * count] (a row of the head) and top, its probability.
int dfl_draft(void* model, int n_seqs, void* const* seqs, const int* ctx, const float* features, int block,
              const float* embeds, float* out, void* head, int first, int count, float* logits, int64_t* best,
              float* top) {
    Model& m = *static_cast<Model*>(model);
    const Config& c = m.c;
    if (n_seqs <= 0 || block <= 0 || m.fc.parts.empty() || m.fc_norm.empty()) return -1;
    if (head && (first < 0 || count < 1 || first + count > block || static_cast<Matrix*>(head)->k != c.hidden)) return -1;
    const int hd = c.head_dim, q_dim = c.heads * hd, qkv_dim = q_dim + 2 * c.kv_heads * hd, H = c.hidden;
    auto job = std::make_shared<DraftForward>();
    job->ctx_rows = 0;
    job->max_len = 0;
    for (int i = 0; i < n_seqs; ++i) {
        auto* s = static_cast<Sequence*>(seqs[i]);
        if (ctx[i] < 0) return -1;
        job->seqs.push_back(s);
        job->ctx_first.push_back(job->ctx_rows);
        job->ctx_count.push_back(ctx[i]);
        job->ctx_rows += ctx[i];
        reserve(m, *s, s->length + ctx[i] + block);
        job->max_len = std::max(job->max_len, s->length + ctx[i] + block);
    }
    const int block_rows = n_seqs * block, rows = job->ctx_rows + block_rows;
    ensure_rope(m, job->max_len);
    m.ctx.resize(size_t(std::max(job->ctx_rows, 1)) * H);
    m.x.resize(size_t(block_rows) * H); m.xn.resize(size_t(block_rows) * H);
    m.qkv.resize(size_t(rows) * qkv_dim); m.att.resize(size_t(block_rows) * q_dim);
    m.gu.resize(size_t(block_rows) * 2 * c.ffn); m.act.resize(size_t(block_rows) * c.ffn);
    m.quant_fc.resize(job->ctx_rows, m.fc.k); m.quant_kv.resize(rows, H); m.quant_h.resize(block_rows, H);
    m.quant_att.resize(block_rows, q_dim); m.quant_ffn.resize(block_rows, c.ffn);
    job->head = static_cast<const Matrix*>(head);
    job->first = first; job->count = count; job->logits = logits; job->best = best; job->top = top;
    if (head) m.quant_head.resize(n_seqs * count, H);
    int phases = 3 + int(m.fc.parts.size()) + 1 + 2;
    for (const Layer& l : m.layers)
        phases += 6 + int(l.qkv.parts.size() + l.o.parts.size() + l.gate_up.parts.size() + l.down.parts.size());
    job->phases.reset(phases, Pool::get().threads());
    job->model = &m;
    job->features = features; job->embeds = embeds; job->out = out;
    job->n_seqs = n_seqs; job->block = block;
    Pool::get().run(job);
    for (int i = 0; i < n_seqs; ++i) static_cast<Sequence*>(seqs[i])->length += ctx[i];
    return 0;
}

}  // extern "C"
