// A forward pass through libllama, for comparing logits across builds (x86 SIMD levels, aarch64 under
// qemu) on the same model and text.
//
// usage: forward MODEL.gguf TEXT N_PROMPT N_THREADS OUT.bin [BUNDLE_DIR [TIERS]]
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

static bool on_eval(struct ggml_tensor * t, bool ask, void * user_data) {
    (void) user_data;
    if (ask && discovering && strncmp(t->name, "ffn_moe_", 8) == 0 && t->op == GGML_OP_MUL_MAT_ID) {
        struct ggml_tensor * w = t->src[0];
        int known = 0;
        for (int i = 0; i < n_weights; i++) known |= weights[i] == w;
        if (!known && n_weights < MAX_WEIGHTS && strstr(w->name, "_exps.weight")) weights[n_weights++] = w;
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

int main(int argc, char ** argv) {
    if (argc < 6 || argc > 8) {
        fprintf(stderr, "usage: forward MODEL.gguf TEXT N_PROMPT N_THREADS OUT.bin [BUNDLE_DIR [TIERS]]\n");
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
    cp.cb_eval = on_eval;
    cp.cb_eval_user_data = NULL;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "forward: cannot create a context\n"); return 2; }

    int n_views = 0;
    if (argc >= 7) {
        discovering = 1;
        decode(ctx, toks, 2, 0, 0);  // the graph of a batch shows every MoE layer's weight tensors
        discovering = 0;
        llama_memory_clear(llama_get_memory(ctx), true);
        n_views = register_views(argv[6], argc == 8 ? argv[7] : NULL);
    }

    const int n_out = n_prompt + N_DECODE;
    float * logits = malloc(sizeof(float) * (size_t) n_out * n_vocab);
    decode(ctx, toks, n_prompt, 0, 1);
    for (int i = 0; i < n_prompt; i++) memcpy(logits + (size_t) i * n_vocab, llama_get_logits_ith(ctx, i), sizeof(float) * n_vocab);
    for (int d = 0; d < N_DECODE; d++) {
        decode(ctx, toks + n_prompt + d, 1, n_prompt + d, 1);
        memcpy(logits + (size_t) (n_prompt + d) * n_vocab, llama_get_logits_ith(ctx, -1), sizeof(float) * n_vocab);
    }

    FILE * f = fopen(argv[5], "wb");
    if (!f) { perror(argv[5]); return 2; }
    const int32_t hdr[5] = {n_vocab, n_prompt, N_DECODE, (int32_t) sysconf(_SC_PAGESIZE), n_views};
    fwrite("DYMFWD01", 1, 8, f);
    fwrite(hdr, sizeof hdr, 1, f);
    fwrite(toks, sizeof(llama_token), (size_t) n_out, f);
    fwrite(logits, sizeof(float), (size_t) n_out * n_vocab, f);
    if (fclose(f) != 0) { perror(argv[5]); return 2; }
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
