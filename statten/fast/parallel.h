/*
 * parallel_for: split [0, total) into `threads` ranges, multiples of `grain`, run on POSIX
 * threads (the calling thread takes the last range). Plain pthreads rather than OpenMP, so the
 * kernels do not load a second OpenMP runtime next to torch's. A thread costs about 0.1 ms to
 * start and join (a Sapphire Rapids VM: more than a LIF over 65,536 neurons and 4 steps takes on
 * one), so each thread gets at least statten_thread_work (2^18) of `item_work` per item, a rough
 * count of the elementary operations (loads, adds) of one item: small calls run on the calling
 * thread alone.
 */
#ifndef STATTEN_PARALLEL_H
#define STATTEN_PARALLEL_H

#include <pthread.h>
#include <stdint.h>

#define STATTEN_MAX_THREADS 256

/* The least work per thread (defined in lif.c; statten_set_thread_work changes it). */
extern int64_t statten_thread_work;

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

static int parallel_for(range_fn body, void *job, int64_t total, int64_t grain,
                        int64_t item_work, int threads) {
    pthread_t ids[STATTEN_MAX_THREADS];
    int started[STATTEN_MAX_THREADS];
    Task tasks[STATTEN_MAX_THREADS];
    const int64_t chunks = (total + grain - 1) / grain;
    const int64_t worth = (double)total * (double)item_work / (double)statten_thread_work;
    if (threads > chunks) threads = (int)chunks;
    if (threads > worth) threads = (int)worth;
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
