// Patch 0001 (per-expert views for MUL_MAT_ID) tested in C against ggml alone, so that it runs
// wherever ggml-cpu builds: x86 (native and other SIMD levels) and aarch64 under qemu.
//
// One MoE layer, out = down(silu(gate(x)) * up(x)) per routed (token, slot), whose experts mix
// Q2_K, Q4_K and Q8_0 through dymoe_expert_view_set, must give for every (token, slot) the bits that
// the whole-layer path (stock code: the layer's 3-D tensors entirely at that expert's type) gives.
// Checked for a prompt batch (48 tokens) and decode batches (1 token), for each thread count given,
// with a Q4_K base (as bundles are converted by default) and a Q8_0 base (a K-quant view on a Q8_0
// tensor needs the larger work buffer the patch plans for). Also: with every view cleared, results
// are bit-identical to before registering (nothing registered = stock path), and the views are
// really used (the mixed layer differs from the base).
//
// usage: views_test [N_THREADS...]        (default: 1 2); exit 0 = pass, 1 = mismatch, 2 = error
#include "ggml.h"
#include "ggml-cpu.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_EMBD   256
#define N_FF     512
#define N_EXPERT 8
#define N_USED   2
#define N_PROMPT 48
#define N_DECODE 4 // decode batches (1 token each), routed so that together they cover every tier

enum { MAT_GATE, MAT_UP, MAT_DOWN, N_MAT };
static const int MAT_NE0[N_MAT] = {N_EMBD, N_EMBD, N_FF}; // input length (row)
static const int MAT_NE1[N_MAT] = {N_FF, N_FF, N_EMBD};   // rows per expert

// A tier of a layer: every expert of the three matrices quantized to one type from one set of weights.
typedef struct {
    enum ggml_type type;
    float          scale;         // weights are scaled by this before quantizing (a distinct copy)
    uint8_t      * data[N_MAT];   // [N_EXPERT][ne1] rows of row_size(type, ne0) bytes
} tier_t;

// ---- deterministic inputs (integer RNG: the same numbers on every platform) --------------------
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float rnd(void) {  // uniform in [-1, 1)
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (float) ((rng_state >> 40) & 0xffffff) / (float) 0x800000 - 1.0f;
}

static float * weights[N_MAT]; // f32 [N_EXPERT][ne1][ne0]
static float x_prompt[N_PROMPT * N_EMBD];
static float x_decode[N_DECODE][N_EMBD];
static int32_t ids_prompt[N_PROMPT * N_USED];
static int32_t ids_decode[N_DECODE][N_USED];

static void make_inputs(void) {
    for (int m = 0; m < N_MAT; m++) {
        size_t n = (size_t) N_EXPERT * MAT_NE1[m] * MAT_NE0[m];
        weights[m] = malloc(n * sizeof(float));
        const float s = 1.0f / sqrtf((float) MAT_NE0[m]);
        for (size_t i = 0; i < n; i++) weights[m][i] = s * rnd();
    }
    for (int i = 0; i < N_PROMPT * N_EMBD; i++) x_prompt[i] = rnd();
    for (int d = 0; d < N_DECODE; d++) for (int i = 0; i < N_EMBD; i++) x_decode[d][i] = rnd();
    for (int t = 0; t < N_PROMPT; t++) {  // every expert routed, slots distinct
        ids_prompt[t * N_USED + 0] = t % N_EXPERT;
        ids_prompt[t * N_USED + 1] = (t / N_EXPERT + 1 + t) % N_EXPERT;
        if (ids_prompt[t * N_USED + 1] == ids_prompt[t * N_USED + 0]) ids_prompt[t * N_USED + 1] = (t + 3) % N_EXPERT;
    }
    for (int d = 0; d < N_DECODE; d++) { ids_decode[d][0] = 2 * d; ids_decode[d][1] = 2 * d + 1; }
}

static void quantize_tier(tier_t * t) {
    for (int m = 0; m < N_MAT; m++) {
        const int64_t ne0 = MAT_NE0[m], nrows = (int64_t) N_EXPERT * MAT_NE1[m];
        const size_t rs = ggml_row_size(t->type, ne0);
        float * src = malloc((size_t) nrows * ne0 * sizeof(float));
        for (int64_t i = 0; i < nrows * ne0; i++) src[i] = t->scale * weights[m][i];
        t->data[m] = malloc(rs * (size_t) nrows);
        size_t n = ggml_quantize_chunk(t->type, src, t->data[m], 0, nrows, ne0, NULL);
        free(src);
        if (n != rs * (size_t) nrows) { fprintf(stderr, "views_test: quantize %s failed\n", ggml_type_name(t->type)); exit(2); }
    }
}

static size_t expert_bytes(enum ggml_type type, int m) { return ggml_row_size(type, MAT_NE0[m]) * MAT_NE1[m]; }

// ---- one layer evaluation -------------------------------------------------------------------------
// view_of[e]: the tier whose data expert e reads through a per-expert view (NULL: no view).
// out: [n_tokens][N_USED][N_EMBD]
static void run_layer(const tier_t * base, const tier_t * const * view_of, const float * x, const int32_t * ids,
                      int n_tokens, int n_threads, float * out) {
    struct ggml_init_params ip = {.mem_size = 64u << 20, .mem_buffer = NULL, .no_alloc = false};
    struct ggml_context * ctx = ggml_init(ip);
    if (!ctx) { fprintf(stderr, "views_test: ggml_init failed\n"); exit(2); }
    struct ggml_tensor * w[N_MAT];
    for (int m = 0; m < N_MAT; m++) {
        w[m] = ggml_new_tensor_3d(ctx, base->type, MAT_NE0[m], MAT_NE1[m], N_EXPERT);
        memcpy(w[m]->data, base->data[m], ggml_nbytes(w[m]));
    }
    struct ggml_tensor * xt = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, N_EMBD, 1, n_tokens);
    memcpy(xt->data, x, sizeof(float) * N_EMBD * n_tokens);
    struct ggml_tensor * it = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, N_USED, n_tokens);
    memcpy(it->data, ids, sizeof(int32_t) * N_USED * n_tokens);

    struct ggml_tensor * g = ggml_mul_mat_id(ctx, w[MAT_GATE], xt, it);   // [N_FF, N_USED, n_tokens]
    struct ggml_tensor * u = ggml_mul_mat_id(ctx, w[MAT_UP], xt, it);
    struct ggml_tensor * h = ggml_mul(ctx, ggml_silu(ctx, g), u);
    struct ggml_tensor * o = ggml_mul_mat_id(ctx, w[MAT_DOWN], h, it);    // [N_EMBD, N_USED, n_tokens]
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, o);

    int n_views = 0;
    for (int e = 0; e < N_EXPERT; e++) {
        const tier_t * v = view_of ? view_of[e] : NULL;
        if (!v) continue;
        for (int m = 0; m < N_MAT; m++) {
            const int rc = dymoe_expert_view_set(w[m], e, v->type, v->data[m] + (size_t) e * expert_bytes(v->type, m), 0);
            if (rc != 0) { fprintf(stderr, "views_test: dymoe_expert_view_set -> %d\n", rc); exit(2); }
        }
        n_views++;
    }
    if (n_views && dymoe_expert_view_count() != N_MAT) { fprintf(stderr, "views_test: view count\n"); exit(2); }
    if (ggml_graph_compute_with_ctx(ctx, gf, n_threads) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "views_test: compute failed\n"); exit(2);
    }
    dymoe_expert_view_clear_all();
    memcpy(out, o->data, sizeof(float) * N_EMBD * N_USED * n_tokens);
    ggml_free(ctx);
}

static int same_bits(const float * a, const float * b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }

static const char * tname(const tier_t * t) { return t ? ggml_type_name(t->type) : "base"; }

// One base type, one thread count: returns the number of failures.
static int check(enum ggml_type base_type, int n_threads, int * n_slots) {
    // tiers: the base (the layer as stored) and the view copies (scaled weights: distinct bits)
    tier_t base = {.type = base_type, .scale = 1.0f};
    tier_t q2 = {.type = GGML_TYPE_Q2_K, .scale = 1.0f};
    tier_t q4 = {.type = GGML_TYPE_Q4_K, .scale = 0.75f};
    tier_t q8 = {.type = GGML_TYPE_Q8_0, .scale = 0.875f};
    tier_t * tiers[] = {&base, &q2, &q4, &q8};
    for (int i = 0; i < 4; i++) quantize_tier(tiers[i]);
    // expert -> view (NULL: the base): Q2_K, Q4_K, Q8_0 mixed in one layer, two experts without a view
    const tier_t * view_of[N_EXPERT] = {&q2, &q4, &q8, NULL, &q2, &q8, &q4, NULL};

    int fails = 0;
    for (int shape = 0; shape < 1 + N_DECODE; shape++) {
        const int n_tok = shape == 0 ? N_PROMPT : 1;
        const float * x = shape == 0 ? x_prompt : x_decode[shape - 1];
        const int32_t * ids = shape == 0 ? ids_prompt : ids_decode[shape - 1];
        const size_t n = (size_t) N_EMBD * N_USED * n_tok;
        float * ref[4];
        for (int i = 0; i < 4; i++) {  // whole-layer path: the layer's tensors entirely at one tier
            ref[i] = malloc(n * sizeof(float));
            run_layer(tiers[i], NULL, x, ids, n_tok, n_threads, ref[i]);
        }
        float * mixed = malloc(n * sizeof(float));
        float * after = malloc(n * sizeof(float));
        run_layer(&base, view_of, x, ids, n_tok, n_threads, mixed);
        run_layer(&base, NULL, x, ids, n_tok, n_threads, after);
        if (!same_bits(after, ref[0], n)) {
            fprintf(stderr, "FAIL base %s, %d threads, %s: results changed after the views were cleared\n",
                    ggml_type_name(base_type), n_threads, shape == 0 ? "prompt" : "decode");
            fails++;
        }
        int differs = 0;
        for (int t = 0; t < n_tok; t++) {
            for (int s = 0; s < N_USED; s++) {
                const int e = ids[t * N_USED + s];
                const tier_t * v = view_of[e];
                int r = 0;
                for (int i = 1; i < 4; i++) if (tiers[i] == v) r = i;
                const size_t off = ((size_t) t * N_USED + s) * N_EMBD;
                differs |= !same_bits(mixed + off, ref[0] + off, N_EMBD);
                (*n_slots)++;
                if (!same_bits(mixed + off, ref[r] + off, N_EMBD)) {
                    int k = 0;
                    while (k < N_EMBD && mixed[off + k] == ref[r][off + k]) k++;
                    fprintf(stderr, "FAIL base %s, %d threads, %s: token %d slot %d expert %d (%s view): "
                            "element %d is %.9g, whole-layer path gives %.9g\n", ggml_type_name(base_type),
                            n_threads, shape == 0 ? "prompt" : "decode", t, s, e, tname(v), k,
                            (double) mixed[off + k], (double) ref[r][off + k]);
                    fails++;
                }
            }
        }
        if (!differs) {
            fprintf(stderr, "FAIL base %s, %d threads: the views were not used (output equals the base layer)\n",
                    ggml_type_name(base_type), n_threads);
            fails++;
        }
        for (int i = 0; i < 4; i++) free(ref[i]);
        free(mixed);
        free(after);
    }
    for (int i = 0; i < 4; i++) for (int m = 0; m < N_MAT; m++) free(tiers[i]->data[m]);
    return fails;
}

int main(int argc, char ** argv) {
    if (dymoe_patch_version() != DYMOE_PATCH_VERSION) { fprintf(stderr, "views_test: unexpected patch version\n"); return 2; }
    int threads[8] = {1, 2}, n_thr = 2;
    if (argc > 1) {
        n_thr = 0;
        for (int i = 1; i < argc && n_thr < 8; i++) threads[n_thr++] = atoi(argv[i]);
    }
    ggml_cpu_init();
    make_inputs();
    const enum ggml_type bases[] = {GGML_TYPE_Q4_K, GGML_TYPE_Q8_0};
    int fails = 0, slots = 0;
    for (int b = 0; b < 2; b++) {
        for (int i = 0; i < n_thr; i++) {
            if (threads[i] < 1) { fprintf(stderr, "views_test: bad thread count\n"); return 2; }
            fails += check(bases[b], threads[i], &slots);
        }
    }
    printf("views_test: %s: %d (token, slot) outputs checked bit for bit; bases Q4_K and Q8_0, views Q2_K/Q4_K/Q8_0, "
           "prompt (%d tokens) and decode (1 token) batches, threads", fails ? "FAIL" : "OK", slots, N_PROMPT);
    for (int i = 0; i < n_thr; i++) printf(" %d", threads[i]);
    printf("\n");
    return fails ? 1 : 0;
}
