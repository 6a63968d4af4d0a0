/* engine_logits: run exact token ids through a llama.cpp build and write every position's logits.
 *
 * Written for benchmarks/engine_conformance.py against llama.h's public API only (no code from the
 * llama.cpp tree). One batch holds all the ids (positions 0..n-1, one sequence, an output row for
 * every position), so the logits are the engine's forward pass over the whole sequence.
 *
 *   engine_logits MODEL.gguf OUT_DIR ID0,ID1,... [--tensors]
 *   engine_logits --quantize IN.gguf OUT.gguf FTYPE EMBEDDING_TYPE
 *
 * Writes OUT_DIR/logits.f32 (float32 [n, V], row-major). With --tensors, every contiguous float32
 * tensor the graph computes ("attn_norm-0", "ffn_sub_out-0", "result_norm", ...) is written, in the
 * order computed, as OUT_DIR/t_<k>.f32 and listed in OUT_DIR/tensors.txt as "k ne0 ne1 ne2 ne3 name"
 * (ne0 innermost; the name last, as it may hold spaces). Exit status: 0 ok,
 * 2 usage or I/O error, 3 the model did not load, 4 the context could not be made, 5 decode failed.
 * The second form runs the engine's quantizer (llama_model_quantize, what llama-quantize calls) with
 * llama_ftype FTYPE and the token embedding in ggml type EMBEDDING_TYPE (ids as in ggml.h), so the
 * script can check that refbitnet imports tables as ggml's own quantizers write them.
 * The engine's own log goes to stderr (the conformance script keeps it as evidence).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "ggml-backend.h"
#include "llama.h"

struct dump {
    const char *dir;
    FILE *index;
    int count;
};

/* Called by the scheduler for every graph node: first with ask = true (do we want this node's data?),
 * then, for nodes we asked for, with ask = false once the data is computed. */
static bool on_tensor(struct ggml_tensor *t, bool ask, void *user) {
    struct dump *d = (struct dump *) user;
    if (ask) {
        return t->type == GGML_TYPE_F32 && t->name[0] != '\0' && ggml_is_contiguous(t);
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/t_%d.f32", d->dir, d->count);
    size_t n = ggml_nbytes(t);
    void *buf = malloc(n);
    if (buf == NULL) return false;
    ggml_backend_tensor_get(t, buf, 0, n);
    FILE *f = fopen(path, "wb");
    if (f != NULL) {
        fwrite(buf, 1, n, f);
        fclose(f);
        fprintf(d->index, "%d %lld %lld %lld %lld %s\n", d->count, (long long) t->ne[0], (long long) t->ne[1],
                (long long) t->ne[2], (long long) t->ne[3], t->name);
        d->count++;
    }
    free(buf);
    return true;
}

static int parse_ids(const char *text, llama_token **out) {
    int cap = 16, n = 0;
    llama_token *ids = malloc(cap * sizeof *ids);
    const char *p = text;
    while (*p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p) { free(ids); return -1; }
        if (n == cap) { cap *= 2; ids = realloc(ids, cap * sizeof *ids); }
        ids[n++] = (llama_token) v;
        p = (*end == ',') ? end + 1 : end;
    }
    *out = ids;
    return n;
}

static int quantize(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s --quantize IN.gguf OUT.gguf FTYPE EMBEDDING_TYPE\n", argv[0]);
        return 2;
    }
    llama_backend_init();
    struct llama_model_quantize_params qp = llama_model_quantize_default_params();
    qp.nthread = 2;
    qp.ftype = (enum llama_ftype) atoi(argv[4]);
    qp.token_embedding_type = (enum ggml_type) atoi(argv[5]);
    qp.allow_requantize = true;
    uint32_t rc = llama_model_quantize(argv[2], argv[3], &qp);
    llama_backend_free();
    return rc == 0 ? 0 : 5;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--quantize") == 0) {
        return quantize(argc, argv);
    }
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf OUT_DIR ID0,ID1,... [--tensors]\n", argv[0]);
        return 2;
    }
    const char *model_path = argv[1], *out_dir = argv[2];
    int want_tensors = argc > 4 && strcmp(argv[4], "--tensors") == 0;
    llama_token *ids;
    int n = parse_ids(argv[3], &ids);
    if (n <= 0) { fprintf(stderr, "ids: expected comma-separated integers\n"); return 2; }

    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(model_path, mp);
    if (model == NULL) { fprintf(stderr, "engine_logits: model did not load\n"); return 3; }

    struct dump d = { out_dir, NULL, 0 };
    char path[4096];
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) n;
    cp.n_batch = cp.n_ubatch = (uint32_t) n;
    cp.n_threads = cp.n_threads_batch = 2;
    if (want_tensors) {
        snprintf(path, sizeof path, "%s/tensors.txt", out_dir);
        d.index = fopen(path, "w");
        if (d.index == NULL) { fprintf(stderr, "%s: cannot write\n", path); return 2; }
        cp.cb_eval = on_tensor;
        cp.cb_eval_user_data = &d;
    }
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (ctx == NULL) { fprintf(stderr, "engine_logits: context not created\n"); return 4; }

    struct llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = ids[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;                      /* an output row for every position */
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "engine_logits: decode failed\n"); return 5; }

    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    snprintf(path, sizeof path, "%s/logits.f32", out_dir);
    FILE *f = fopen(path, "wb");
    if (f == NULL) { fprintf(stderr, "%s: cannot write\n", path); return 2; }
    for (int i = 0; i < n; i++) {
        fwrite(llama_get_logits_ith(ctx, i), sizeof(float), (size_t) n_vocab, f);
    }
    fclose(f);
    if (d.index != NULL) fclose(d.index);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    free(ids);
    return 0;
}
