// The thread pool of parallel.h.
#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOWBIT_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define LOWBIT_PAUSE() __asm__ __volatile__("yield")
#else
#define LOWBIT_PAUSE() ((void)0)
#endif

namespace lowbit {
namespace cpu {
namespace {

constexpr int kSpinIterations = 1 << 14;  // ~50-100 us of pause loops before sleeping

thread_local bool t_in_task = false;

class Pool {
 public:
  // Runs the job; false if the pool is busy (the caller then runs it serially).
  bool run(int64_t num_tasks, int num_threads, const TaskFn& fn) {
    std::unique_lock<std::mutex> job(job_mutex_, std::try_to_lock);
    if (!job.owns_lock()) return false;
    grow(num_threads - 1);
    const int threads = static_cast<int>(std::min<int64_t>({static_cast<int64_t>(num_threads),
                                                            static_cast<int64_t>(workers_.size()) + 1,
                                                            num_tasks}));
    if (threads <= 1) return false;
    fn_ = &fn;
    num_tasks_ = num_tasks;
    next_.store(0, std::memory_order_relaxed);
    job_threads_ = threads;
    pending_.store(threads - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_work_.notify_all();
    work(0);
    for (int i = 0; pending_.load(std::memory_order_acquire) != 0; ++i) {
      if (i < kSpinIterations) {
        LOWBIT_PAUSE();
        continue;
      }
      std::unique_lock<std::mutex> lk(mutex_);
      cv_done_.wait(lk, [&] { return pending_.load(std::memory_order_acquire) == 0; });
      break;
    }
    fn_ = nullptr;
    return true;
  }

 private:
  void work(int thread) {
    t_in_task = true;
    for (;;) {
      const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
      if (t >= num_tasks_) break;
      (*fn_)(t, thread);
    }
    t_in_task = false;
  }

  void grow(int wanted) {
    while (static_cast<int>(workers_.size()) < wanted) {
      const int index = static_cast<int>(workers_.size()) + 1;
      // The generation the new worker has "seen" is read here, before the job is published,
      // not when the thread first runs (which may be after).
      const uint64_t seen = generation_.load(std::memory_order_acquire);
      try {
        workers_.emplace_back([this, index, seen] { loop(index, seen); });
      } catch (...) {  // std::system_error: no more threads; use the ones we have
        return;
      }
    }
  }

  void loop(int index, uint64_t seen) {
    for (;;) {
      uint64_t g = seen;
      for (int i = 0; i < kSpinIterations && (g = generation_.load(std::memory_order_acquire)) == seen; ++i)
        LOWBIT_PAUSE();
      if (g == seen) {
        std::unique_lock<std::mutex> lk(mutex_);
        cv_work_.wait(lk, [&] { return (g = generation_.load(std::memory_order_acquire)) != seen; });
      }
      seen = g;
      if (index >= job_threads_) continue;  // this job wants fewer threads
      work(index);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(mutex_);
        cv_done_.notify_one();
      }
    }
  }

  std::mutex job_mutex_;  // one job at a time
  std::mutex mutex_;      // guards sleeping and waking
  std::condition_variable cv_work_, cv_done_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0};
  std::atomic<int> pending_{0};
  const TaskFn* fn_ = nullptr;
  int64_t num_tasks_ = 0;
  int job_threads_ = 0;
};

// Never destroyed: workers may be asleep in the pool at exit. A forked child has none of the
// parent's threads, so it gets a fresh pool (the old one is abandoned, not destroyed).
Pool* g_pool = nullptr;
std::once_flag g_atfork_once;

Pool& pool() {
  std::call_once(g_atfork_once, [] {
#if defined(__unix__) || defined(__APPLE__)
    pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr; });
#endif
  });
  static std::mutex create;
  std::lock_guard<std::mutex> lk(create);
  if (g_pool == nullptr) g_pool = new Pool();
  return *g_pool;
}

}  // namespace

void parallel_for(int64_t num_tasks, int num_threads, const TaskFn& fn) {
  if (num_tasks <= 0) return;
  if (num_threads > 1 && num_tasks > 1 && !t_in_task && pool().run(num_tasks, num_threads, fn)) return;
  for (int64_t t = 0; t < num_tasks; ++t) fn(t, 0);
}

int threads_for(double work, double min_per_thread, int num_threads) {
  const double by_work = work / std::max(min_per_thread, 1.0);
  const int t = by_work < 1.0 ? 1 : static_cast<int>(std::min<double>(by_work, num_threads));
  return std::max(1, std::min(t, num_threads));
}

}  // namespace cpu
}  // namespace lowbit
