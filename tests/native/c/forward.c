// A forward pass through libllama, for comparing logits across builds (x86 SIMD levels, aarch64 under
// qemu) on the same model and text.
//
// usage: forward [--hook] [--kv-f32] MODEL.gguf TEXT N_PROMPT N_THREADS OUT.bin [BUNDLE_DIR [TIERS]]
//
// Loads MODEL with mmap and without extra buffer types (use_extra_bufts = false: no repack, no AMX;
// the product's setting), tokenizes TEXT as llama-perplexity does (BOS added when the vocabulary asks
// for it, no special-token parsing), decodes the first N_PROMPT tokens as one prompt batch (logits
// for every position), then the next N_DECODE tokens of the text one at a time (decode batches,
// teacher-forced so that every build sees the same tokens). With BUNDLE_DIR, the experts of every MoE
// layer first get per-expert views (patch 0001) into the bundle's sidecars, mixing the tiers present
// (experts.Q2_K.gguf, experts.Q4_K.gguf, experts.Q8_0.gguf), or only those named in TIERS
// (comma-separated, e.g. Q4_K): expert e of layer l reads tier (l + e) mod n_tiers, as the runtime
// does with a plan. Views of every expert into the sidecar of the base's own type give the base's bits.
//
// --hook (patch 0003, DYMOE_PATCH_VERSION >= 2): also run the C hot path, as the runtime does: a
// dymoe_layer_hook on every MoE layer's first expert weight (in graph order) with the layer's F32
// router, ready flags that start at 0 and that the miss function sets, and look-ahead with the next
// layer's router (not folded with its norm: the prediction's quality is not the point here) and a
// wake pipe; before the decode batches every flag is cleared again (as after an eviction), so that
// misses, predictions and prefetch requests happen in decode too. The hook reads and publishes but
// changes nothing the graph computes: the logits must be those of the same run without --hook (the
// caller compares the bits). The program checks the hook's own outputs and exits 3 on a mismatch:
// one log row per (layer, token) with k distinct ids in range and gate weights that sum to 1 (the
// model renormalises), misses only of experts not ready and, per layer, as many as the distinct
// experts each call selected that were not ready (from the log), the use counters equal to the
// distinct experts of each call, valid prefetch requests.
//
// --kv-f32: an F32 KV cache instead of llama.cpp's default F16. The attention products then run in F32
// on every CPU; with F16, a CPU with FP16 vector arithmetic (Cortex-A76: -mcpu=cortex-a76) accumulates
// ggml's F16 dot products in FP16 lanes (ggml-cpu/simd-mappings.h), where x86 widens to F32.
//
// OUT.bin: "DYMFWD01", int32 n_vocab, n_prompt, n_decode, page size, n_views; int32 tokens
// [n_prompt + n_decode]; float32 logits [n_prompt + n_decode][n_vocab]. Exit 0 on success.
#define _GNU_SOURCE
#include "ggml.h"
#include "ggml-cpu.h"
#include "gguf.h"
#include "llama.h"

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define N_DECODE 4
#define MAX_WEIGHTS 1024

static const char * const MATS[3] = {"gate", "up", "down"};

// expert weight tensors seen by the eval callback: blk.L.ffn_{gate,up,down}_exps.weight
static struct ggml_tensor * weights[MAX_WEIGHTS];
static int n_weights = 0;
static int discovering = 0;

// --hook: per model layer, the first expert weight in graph order and the router (ffn_gate_inp)
#define MAX_LAYERS 256
#define MAX_E 256
static struct ggml_tensor * first_weight[MAX_LAYERS];
static struct ggml_tensor * router[MAX_LAYERS];
static int n_expert_used = 0;  // k: the ids tensor's first dimension

static int layer_of(const char * name, const char * prefix) {  // "<prefix>L" or "blk.L." -> L, else -1
    int l = -1;
    if (prefix) {
        const size_t n = strlen(prefix);
        if (strncmp(name, prefix, n) != 0 || sscanf(name + n, "%d", &l) != 1) return -1;
    } else if (sscanf(name, "blk.%d.", &l) != 1) {
        return -1;
    }
    return l >= 0 && l < MAX_LAYERS ? l : -1;
}

static bool on_eval(struct ggml_tensor * t, bool ask, void * user_data) {
    (void) user_data;
    if (ask && discovering && strncmp(t->name, "ffn_moe_", 8) == 0 && t->op == GGML_OP_MUL_MAT_ID) {
        struct ggml_tensor * w = t->src[0];
        int known = 0;
        for (int i = 0; i < n_weights; i++) known |= weights[i] == w;
        if (!known && n_weights < MAX_WEIGHTS && strstr(w->name, "_exps.weight")) weights[n_weights++] = w;
        const int l = layer_of(w->name, NULL);
        if (l >= 0 && !first_weight[l]) first_weight[l] = w;
        n_expert_used = (int) t->src[2]->ne[0];
    }
    if (ask && discovering && t->op == GGML_OP_MUL_MAT) {
        const int l = layer_of(t->name, "ffn_moe_logits-");
        if (l >= 0) router[l] = t->src[0];
    }
    return false;  // never split the graph: the same computation with or without discovery
}

static void quiet(enum ggml_log_level level, const char * text, void * user_data) {
    (void) user_data;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static char * read_text(const char * path) {
    FILE * f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char * s = malloc((size_t) n + 1);
    if (fread(s, 1, (size_t) n, f) != (size_t) n) { perror(path); exit(2); }
    fclose(f);
    if (n > 0 && s[n - 1] == '\n') n--;  // as llama.cpp's -f does
    s[n] = 0;
    return s;
}

static void decode(struct llama_context * ctx, const llama_token * toks, int n, int pos0, int all_logits) {
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = toks[i];
        b.pos[i] = pos0 + i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = 0;
        b.logits[i] = all_logits || i == n - 1;
    }
    b.n_tokens = n;
    const int rc = llama_decode(ctx, b);
    llama_batch_free(b);
    if (rc != 0) { fprintf(stderr, "forward: llama_decode returned %d\n", rc); exit(2); }
}

// Register per-expert views into the bundle's sidecars; returns the number of views set.
static int register_views(const char * bundle, const char * only) {
    static const char * const TIERS[3] = {"Q2_K", "Q4_K", "Q8_0"};
    struct gguf_context * g[3];
    const uint8_t * base[3];
    int n_tiers = 0;
    for (int i = 0; i < 3; i++) {
        if (only && !strstr(only, TIERS[i])) continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/experts.%s.gguf", bundle, TIERS[i]);
        struct gguf_init_params gp = {.no_alloc = true, .ctx = NULL};
        struct gguf_context * gc = gguf_init_from_file(path, gp);
        if (!gc) continue;
        int fd = open(path, O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) != 0) { perror(path); exit(2); }
        void * p = mmap(NULL, (size_t) st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        close(fd);
        if (p == MAP_FAILED) { perror("mmap"); exit(2); }
        g[n_tiers] = gc;
        base[n_tiers] = (const uint8_t *) p + gguf_get_data_offset(gc);
        n_tiers++;
    }
    if (n_tiers == 0) { fprintf(stderr, "forward: no experts.*.gguf in %s\n", bundle); exit(2); }
    int n = 0;
    for (int i = 0; i < n_weights; i++) {
        struct ggml_tensor * w = weights[i];
        int layer = -1, m = -1;
        for (int k = 0; k < 3; k++) {
            char suffix[32];
            snprintf(suffix, sizeof suffix, ".ffn_%s_exps.weight", MATS[k]);
            const char * at = strstr(w->name, suffix);
            if (at && sscanf(w->name, "blk.%d.", &layer) == 1) m = k;
        }
        if (m < 0) continue;
        for (int e = 0; e < w->ne[2]; e++) {
            const int t = (layer + e) % n_tiers;
            char name[128];
            snprintf(name, sizeof name, "blk.%d.ffn_%s_exps.%d", layer, MATS[m], e);
            const int64_t id = gguf_find_tensor(g[t], name);
            if (id < 0) { fprintf(stderr, "forward: %s not in a sidecar\n", name); exit(2); }
            const int rc = dymoe_expert_view_set(w, e, gguf_get_tensor_type(g[t], id),
                                                 base[t] + gguf_get_tensor_offset(g[t], id), 0);
            if (rc != 0) { fprintf(stderr, "forward: dymoe_expert_view_set(%s) -> %d\n", name, rc); exit(2); }
            n++;
        }
    }
    return n;
}

// ---- --hook: patch 0003's C hot path -----------------------------------------------------------
#define LOG_CAP 65536
#define REQ_CAP 4096
static uint8_t ready[MAX_LAYERS][MAX_E];
static int64_t n_missed[MAX_LAYERS];
static int hook_errors = 0;

static void on_miss(int32_t layer, int32_t n, const int32_t * experts) {
    for (int i = 0; i < n; i++) {
        const int32_t e = experts[i];
        if (layer < 0 || layer >= MAX_LAYERS || e < 0 || e >= MAX_E || ready[layer][e]) {
            fprintf(stderr, "forward: on_miss(layer %d, expert %d): not a missing expert\n", layer, e);
            hook_errors++;
            continue;
        }
        ready[layer][e] = 1;  // "read in": the runtime would read the expert's pages here
        n_missed[layer]++;
    }
}

struct hot_run {
    struct dymoe_hot * state;
    struct dymoe_layer_hook hooks[MAX_LAYERS];
    int32_t log_layer[LOG_CAP], log_ids[LOG_CAP * 8], current, requests[REQ_CAP * 2], taken[REQ_CAP * 2];
    float log_w[LOG_CAP * 8];
    int64_t counters[DYMOE_HOT_NC * MAX_LAYERS];
    uint8_t prefetch, in_use[MAX_LAYERS][MAX_E];
    int pipe_fd[2], n_layers, k, n_rows, n_requests;
};

static void hot_start(struct hot_run * h, int k) {
    int n_layers = 0;
    for (int l = 0; l < MAX_LAYERS; l++) if (first_weight[l]) n_layers = l + 1;
    if (n_layers == 0 || k < 1 || k > 8) { fprintf(stderr, "forward: --hook: no MoE layer, or k = %d\n", k); exit(2); }
    if (pipe(h->pipe_fd) != 0) { perror("pipe"); exit(2); }
    fcntl(h->pipe_fd[0], F_SETFL, O_NONBLOCK);
    h->n_layers = n_layers;
    h->k = k;
    h->current = -1;
    h->prefetch = 1;
    h->state = dymoe_hot_new(k, LOG_CAP, h->log_layer, h->log_ids, h->log_w, n_layers, h->counters, &h->current,
                             on_miss, h->pipe_fd[1], h->requests, REQ_CAP);
    if (!h->state) { fprintf(stderr, "forward: dymoe_hot_new failed\n"); exit(2); }
    for (int l = 0; l < n_layers; l++) {
        struct ggml_tensor * w = first_weight[l];
        if (!w) continue;
        struct ggml_tensor * r = router[l];
        const int n_expert = (int) w->ne[2];
        if (n_expert > MAX_E) { fprintf(stderr, "forward: --hook: %d experts\n", n_expert); exit(2); }
        const int r_ok = r && r->type == GGML_TYPE_F32 && r->ne[1] == n_expert;
        const int nx = l + 1 < n_layers && first_weight[l + 1] && router[l + 1] &&
                       router[l + 1]->type == GGML_TYPE_F32 ? l + 1 : -1;
        if (!r_ok) { fprintf(stderr, "forward: --hook: layer %d has no F32 router\n", l); exit(2); }
        h->hooks[l] = (struct dymoe_layer_hook) {
            .state = h->state, .layer = l, .n_expert = n_expert, .ready = ready[l], .router = r->data,
            .renorm = 1, .next = nx, .next_router = nx >= 0 ? router[nx]->data : NULL,
            .n_next = nx >= 0 ? (int32_t) router[nx]->ne[1] : 0, .next_ready = nx >= 0 ? ready[nx] : NULL,
            .prefetch = &h->prefetch, .in_use = h->in_use[l],
        };
        const int rc = dymoe_hook_set(w, &h->hooks[l]);
        if (rc != 0) { fprintf(stderr, "forward: dymoe_hook_set(%s) -> %d\n", w->name, rc); exit(2); }
    }
}

// after a decode: drain the wake pipe and the prefetch queue (the runtime's pager thread does this)
static void hot_drain(struct hot_run * h) {
    char buf[256];
    while (read(h->pipe_fd[0], buf, sizeof buf) > 0) {}
    const int n = dymoe_hot_requests(h->state, h->taken, REQ_CAP);
    for (int i = 0; i < n; i++) {
        const int l = h->taken[2 * i], e = h->taken[2 * i + 1];
        if (l < 0 || l >= h->n_layers || e < 0 || e >= h->hooks[l].n_expert) {
            fprintf(stderr, "forward: prefetch request (%d, %d) out of range\n", l, e);
            hook_errors++;
        }
    }
    h->n_requests += n;
}

// after the last decode: check the log and the counters against each other; clear the hooks
static void hot_finish(struct hot_run * h, int n_tokens) {
    const int32_t rows = dymoe_hot_log_take(h->state);
    const int L = h->n_layers, k = h->k;
    int64_t uses[MAX_LAYERS] = {0}, misses[MAX_LAYERS] = {0};
    static uint8_t seen[MAX_LAYERS][MAX_E];
    uint8_t in_call[MAX_E];
    memset(seen, 0, sizeof seen);
    if (rows != L * n_tokens || rows > LOG_CAP) {
        fprintf(stderr, "forward: hook log has %d rows, expected %d layers x %d tokens\n", rows, L, n_tokens);
        hook_errors++;
    }
    for (int r = 0; r < rows && r < LOG_CAP; r++) {
        const int l = h->log_layer[r];
        const int E = l >= 0 && l < L ? h->hooks[l].n_expert : 0;
        const int32_t * ids = h->log_ids + (size_t) r * k;
        const float * w = h->log_w + (size_t) r * k;
        double sum = 0;
        int ok = E > 0;
        for (int j = 0; j < k && ok; j++) {
            ok = ids[j] >= 0 && ids[j] < E && w[j] > 0;
            for (int i = 0; i < j && ok; i++) ok = ids[i] != ids[j];
            sum += w[j];
        }
        if (!ok || sum < 1 - 1e-5 || sum > 1 + 1e-5) {
            fprintf(stderr, "forward: hook log row %d (layer %d): bad ids or weights (sum %.7f)\n", r, l, sum);
            hook_errors++;
            continue;
        }
        // a call is a run of rows of one layer: its distinct experts are its uses; in the run that
        // opens a phase (prompt, or decode after the flags were cleared) those first seen are misses
        const int n_prompt_rows = L * (n_tokens - N_DECODE);
        if (r == 0 || h->log_layer[r - 1] != l || r >= n_prompt_rows) memset(in_call, 0, sizeof in_call);
        for (int j = 0; j < k; j++) {
            if (!in_call[ids[j]]) { in_call[ids[j]] = 1; uses[l]++; }
            if (!seen[l][ids[j]]) { seen[l][ids[j]] = 1; misses[l]++; }
        }
        if (r + 1 == n_prompt_rows) memset(seen, 0, sizeof seen);  // the flags are cleared here
    }
    int64_t pred = 0, hits = 0, scored = 0, sum_miss = 0;
    for (int l = 0; l < L; l++) {
        const int64_t c_use = h->counters[0 * L + l], c_miss = h->counters[1 * L + l];
        hits += h->counters[2 * L + l];
        scored += h->counters[3 * L + l];
        pred += h->counters[4 * L + l];
        sum_miss += c_miss;
        if (c_use != uses[l] || c_miss != misses[l] || c_miss != n_missed[l]) {
            fprintf(stderr, "forward: layer %d: counters uses %lld misses %lld, on_miss saw %lld; the log gives "
                    "uses %lld misses %lld\n", l, (long long) c_use, (long long) c_miss, (long long) n_missed[l],
                    (long long) uses[l], (long long) misses[l]);
            hook_errors++;
        }
    }
    int64_t times[3];
    dymoe_hot_times(h->state, times);
    if (times[0] != (int64_t) L * (1 + N_DECODE)) {
        fprintf(stderr, "forward: %lld hook calls, expected %d\n", (long long) times[0], L * (1 + N_DECODE));
        hook_errors++;
    }
    for (int l = 0; l < L; l++) if (first_weight[l]) dymoe_hook_set(first_weight[l], NULL);
    dymoe_hot_free(h->state);
    close(h->pipe_fd[0]);
    close(h->pipe_fd[1]);
    printf("forward: hook: %d log rows, %lld misses, %lld predicted, %lld of %lld selections predicted, "
           "%d prefetch requests, %lld calls%s\n", rows, (long long) sum_miss, (long long) pred, (long long) hits,
           (long long) scored, h->n_requests, (long long) times[0], hook_errors ? ", ERRORS" : "");
}

int main(int argc, char ** argv) {
    int hook = 0, kv_f32 = 0;
    while (argc > 1 && strncmp(argv[1], "--", 2) == 0) {
        if (strcmp(argv[1], "--hook") == 0) hook = 1;
        else if (strcmp(argv[1], "--kv-f32") == 0) kv_f32 = 1;
        else { fprintf(stderr, "forward: unknown option %s\n", argv[1]); return 2; }
        argv++;
        argc--;
    }
    if (argc < 6 || argc > 8) {
        fprintf(stderr, "usage: forward [--hook] [--kv-f32] MODEL.gguf TEXT N_PROMPT N_THREADS OUT.bin [BUNDLE_DIR [TIERS]]\n");
        return 2;
    }
    const int n_prompt = atoi(argv[3]), n_threads = atoi(argv[4]);
    if (n_prompt < 2 || n_threads < 1) { fprintf(stderr, "forward: bad N_PROMPT or N_THREADS\n"); return 2; }
    llama_log_set(quiet, NULL);
    llama_backend_init();

    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.load_mode = LLAMA_LOAD_MODE_MMAP;
    mp.use_extra_bufts = false;
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "forward: cannot load %s\n", argv[1]); return 2; }
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    char * text = read_text(argv[2]);
    const int n_text = (int) strlen(text);
    llama_token * toks = malloc(sizeof(llama_token) * ((size_t) n_text + 2));
    const int n_tok = llama_tokenize(vocab, text, n_text, toks, n_text + 2, true, false);
    if (n_tok < n_prompt + N_DECODE) { fprintf(stderr, "forward: text too short (%d tokens)\n", n_tok); return 2; }

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) (n_prompt + N_DECODE);
    cp.n_batch = cp.n_ubatch = (uint32_t) n_prompt;
    cp.n_seq_max = 1;
    cp.n_threads = cp.n_threads_batch = n_threads;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (kv_f32) cp.type_k = cp.type_v = GGML_TYPE_F32;
    cp.cb_eval = on_eval;
    cp.cb_eval_user_data = NULL;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "forward: cannot create a context\n"); return 2; }

    int n_views = 0;
    if (argc >= 7 || hook) {
        discovering = 1;
        decode(ctx, toks, 2, 0, 0);  // the graph of a batch shows every MoE layer's weight tensors
        discovering = 0;
        llama_memory_clear(llama_get_memory(ctx), true);
        if (argc >= 7) n_views = register_views(argv[6], argc == 8 ? argv[7] : NULL);
    }
    static struct hot_run hot;
    if (hook) {
        if (dymoe_patch_version() < 2) { fprintf(stderr, "forward: --hook needs patch 0003\n"); return 2; }
        hot_start(&hot, n_expert_used);
    }

    const int n_out = n_prompt + N_DECODE;
    float * logits = malloc(sizeof(float) * (size_t) n_out * n_vocab);
    decode(ctx, toks, n_prompt, 0, 1);
    for (int i = 0; i < n_prompt; i++) memcpy(logits + (size_t) i * n_vocab, llama_get_logits_ith(ctx, i), sizeof(float) * n_vocab);
    if (hook) {
        hot_drain(&hot);
        memset(ready, 0, sizeof ready);  // as if every expert had been evicted
    }
    for (int d = 0; d < N_DECODE; d++) {
        decode(ctx, toks + n_prompt + d, 1, n_prompt + d, 1);
        memcpy(logits + (size_t) (n_prompt + d) * n_vocab, llama_get_logits_ith(ctx, -1), sizeof(float) * n_vocab);
        if (hook) hot_drain(&hot);
    }
    if (hook) hot_finish(&hot, n_out);

    FILE * f = fopen(argv[5], "wb");
    if (!f) { perror(argv[5]); return 2; }
    const int32_t hdr[5] = {n_vocab, n_prompt, N_DECODE, (int32_t) sysconf(_SC_PAGESIZE), n_views};
    fwrite("DYMFWD01", 1, 8, f);
    fwrite(hdr, sizeof hdr, 1, f);
    fwrite(toks, sizeof(llama_token), (size_t) n_out, f);
    fwrite(logits, sizeof(float), (size_t) n_out * n_vocab, f);
    if (fclose(f) != 0) { perror(argv[5]); return 2; }
    if (hook_errors) return 3;
    printf("forward: %d prompt + %d decode tokens, %d threads, page size %ld, %d expert views\n",
           n_prompt, N_DECODE, n_threads, sysconf(_SC_PAGESIZE), n_views);

    dymoe_expert_view_clear_all();
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    free(logits);
    free(toks);
    free(text);
    return 0;
}
