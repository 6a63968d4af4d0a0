/* engine_speed: time a llama.cpp build the way benchmarks/bench_generate.py times refbitnet.
 *
 * Written for bench_generate.py --llama-cpp against llama.h's public API only (no code from the llama.cpp
 * tree). One process: load the model, make a context of CTX positions (KV cache f16, llama.cpp's default),
 * prefill PROMPT pseudo-random ids in one batch with the logits of the last position only, then decode
 * DECODE greedy tokens one by one (argmax of each step's logits, as bench_generate does). The weights are
 * read into memory, not memory-mapped (LLAMA_LOAD_MODE_NONE, see below).
 *
 *   engine_speed MODEL.gguf THREADS PROMPT DECODE CTX
 *
 * Prints one line "RESULT {json}": load_s, first_token_s, prefill_tokens_per_s, decode_tokens_per_s,
 * decode_median_ms, peak_rss_mb (ru_maxrss / 1024). Exit status: 0 ok, 2 usage, 3 the model did not load,
 * 4 the context could not be made, 5 decode failed.
 */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

#include "llama.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

static llama_token argmax(const float *logits, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) {
        if (logits[i] > logits[best]) best = i;
    }
    return best;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s MODEL.gguf THREADS PROMPT DECODE CTX\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[2]), n_prompt = atoi(argv[3]), n_decode = atoi(argv[4]), n_ctx = atoi(argv[5]);
    if (threads < 1 || n_prompt < 1 || n_decode < 1 || n_ctx < n_prompt + n_decode) {
        fprintf(stderr, "engine_speed: expected THREADS, PROMPT, DECODE >= 1 and CTX >= PROMPT + DECODE\n");
        return 2;
    }
    double t0 = now();
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.load_mode = LLAMA_LOAD_MODE_NONE;   /* weights read into the process's memory, not memory-mapped (as
                              llama-bench -mmp 0): a 4 KiB-page mapping of the file decoded slower on this project's
                              machine kind, and refbitnet too holds its packed weights in its own huge-page memory */
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (model == NULL) { fprintf(stderr, "engine_speed: model did not load\n"); return 3; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) n_ctx;
    cp.n_batch = cp.n_ubatch = (uint32_t) n_prompt;
    cp.n_threads = cp.n_threads_batch = threads;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (ctx == NULL) { fprintf(stderr, "engine_speed: context not created\n"); return 4; }
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    double load_s = now() - t0;

    struct llama_batch batch = llama_batch_init(n_prompt, 0, 1);
    unsigned long long state = 12345;
    for (int i = 0; i < n_prompt; i++) {
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        batch.token[i] = (llama_token) ((state >> 33) % (unsigned long long) n_vocab);
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = i == n_prompt - 1;
    }
    batch.n_tokens = n_prompt;
    double t = now();
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "engine_speed: prefill failed\n"); return 5; }
    llama_token token = argmax(llama_get_logits_ith(ctx, n_prompt - 1), n_vocab);
    double first = now() - t;

    double *steps = malloc(sizeof(double) * (size_t) n_decode), total = 0;
    for (int i = 0; i < n_decode; i++) {
        batch.token[0] = token;
        batch.pos[0] = n_prompt + i;
        batch.n_seq_id[0] = 1;
        batch.seq_id[0][0] = 0;
        batch.logits[0] = 1;
        batch.n_tokens = 1;
        t = now();
        if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "engine_speed: decode failed\n"); return 5; }
        token = argmax(llama_get_logits_ith(ctx, 0), n_vocab);
        steps[i] = now() - t;
        total += steps[i];
    }
    qsort(steps, (size_t) n_decode, sizeof(double), cmp_double);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("RESULT {\"threads\": %d, \"load_s\": %.3f, \"first_token_s\": %.4f, \"prefill_tokens_per_s\": %.2f, "
           "\"decode_tokens_per_s\": %.3f, \"decode_median_ms\": %.2f, \"peak_rss_mb\": %.1f}\n",
           threads, load_s, first, n_prompt / first, n_decode / total, 1e3 * steps[n_decode / 2],
           ru.ru_maxrss / 1024.0);
    free(steps);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
