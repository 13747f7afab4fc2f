// A persistent thread pool for the CPU kernels.
//
// parallel_for(num_tasks, num_threads, fn) runs fn(task, thread) for every task in
// [0, num_tasks) on up to num_threads threads, the calling thread being thread 0; tasks are
// handed out one at a time from a shared counter (dynamic load balance), and `thread` is
// in [0, num_threads) so kernels can index per-thread scratch. It returns when all tasks
// are done. fn must not throw (allocate before calling). Calls made from inside a task, or
// while another thread is using the pool, run serially on the caller.
//
// The workers live for the life of the process: they spin briefly after each job (a
// decode step calls kernels back to back, and a futex wake-up costs tens of microseconds),
// then sleep on a condition variable. After fork() the child starts a new pool.
#pragma once

#include <cstdint>
#include <functional>

namespace lowbit {
namespace cpu {

using TaskFn = std::function<void(int64_t task, int thread)>;

void parallel_for(int64_t num_tasks, int num_threads, const TaskFn& fn);

// Threads worth using for `work` units when each thread should get at least `min_per_thread`
// units: in [1, num_threads].
int threads_for(double work, double min_per_thread, int num_threads);

}  // namespace cpu
}  // namespace lowbit
