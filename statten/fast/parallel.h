/*
 * parallel_for: split [0, total) into `threads` ranges, multiples of `grain`, run on POSIX
 * threads (the calling thread takes the last range). Plain pthreads rather than OpenMP, so the
 * kernels do not load a second OpenMP runtime next to torch's.
 */
#ifndef STATTEN_PARALLEL_H
#define STATTEN_PARALLEL_H

#include <pthread.h>
#include <stdint.h>

#define STATTEN_MAX_THREADS 256

typedef void (*range_fn)(void *job, int64_t begin, int64_t end);

typedef struct {
    range_fn body;
    void *job;
    int64_t begin, end;
} Task;

static void *run_task(void *arg) {
    const Task *task = arg;
    task->body(task->job, task->begin, task->end);
    return 0;
}

static int parallel_for(range_fn body, void *job, int64_t total, int64_t grain, int threads) {
    pthread_t ids[STATTEN_MAX_THREADS];
    int started[STATTEN_MAX_THREADS];
    Task tasks[STATTEN_MAX_THREADS];
    const int64_t chunks = (total + grain - 1) / grain;
    if (threads > chunks) threads = (int)chunks;
    if (threads > STATTEN_MAX_THREADS) threads = STATTEN_MAX_THREADS;
    if (threads < 1) threads = 1;
    for (int k = 0; k < threads; k++) {
        const int64_t begin = chunks * k / threads * grain, end = chunks * (k + 1) / threads * grain;
        tasks[k] = (Task){body, job, begin, end < total ? end : total};
    }
    for (int k = 0; k < threads - 1; k++) {
        started[k] = pthread_create(&ids[k], 0, run_task, &tasks[k]) == 0;
        if (!started[k]) run_task(&tasks[k]); /* no thread to be had: run it here */
    }
    run_task(&tasks[threads - 1]);
    for (int k = 0; k < threads - 1; k++)
        if (started[k]) pthread_join(ids[k], 0);
    return 0;
}

#endif
