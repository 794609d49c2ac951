// procpool - the dispatcher: owns the workers and one I/O thread that
// sends tasks, reads results, notices deaths and replaces workers.
//
// Invariant: every chunk handed to submit() is delivered to its job exactly
// once, as results or as a failure, whatever happens to the workers or the
// pool. That is what keeps every wait in the library from hanging.
#pragma once

#include <sys/eventfd.h>
#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "../errors.hpp"
#include "../options.hpp"
#include "callback_runner.hpp"
#include "claims.hpp"
#include "inbox.hpp"
#include "job.hpp"
#include "launcher.hpp"
#include "outbox.hpp"
#include "output_relay.hpp"
#include "protocol.hpp"
#include "ring.hpp"
#include "shm.hpp"
#include "system.hpp"
#include "thread.hpp"
#include "worker.hpp"

namespace procpool::detail {

/// One task on its way to a worker: a serialized task frame and where its
/// outcome goes.
struct Chunk {
  std::shared_ptr<JobState> job;
  std::uint64_t index = 0;  // the chunk's number within its job
  TaskBytes frame;          // a task frame (from Dispatcher::new_frame()); the dispatcher stamps the task id
  SharedStates shares;      // the SharedMemory blocks the frame refers to: held until the task is settled
};

class Dispatcher final : public JobHost, public std::enable_shared_from_this<Dispatcher> {
 public:
  Dispatcher(const Options& options, std::unique_ptr<Launcher> launcher)
      : launcher_(std::move(launcher)),
        processes_(options.processes),
        max_tasks_per_child_(options.maxtasksperchild),
        max_in_flight_(std::max<std::size_t>(1, options.max_tasks_in_flight)),
        worker_spin_(options.worker_spin),
        retries_(options.retries),
        task_timeout_(options.task_timeout),
        max_rss_(options.max_memory_per_child),
        address_space_limit_(options.memory_limit_per_child),
        max_message_(std::min<std::size_t>(options.max_message_bytes, 0xffffffffu)),
        task_memory_(std::make_shared<TaskMemory>(options.shared_memory_threshold)),
        shm_threshold_(task_memory_->threshold()),
        init_id_(InitializerAccess::id(options.initializer)),
        init_state_(InitializerAccess::state(options.initializer)),
        init_shares_(InitializerAccess::shares(options.initializer)) {
    wake_ = make_tracked("eventfd", [] { return ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); });
    if (options.worker_output != WorkerOutput::inherit || options.on_worker_output) {
      relay_ = std::make_unique<OutputRelay>(options.worker_output, options.on_worker_output);
    }
    thread_ = InternalThread("the pool's I/O thread", [this] { io_loop(); });
  }

  Dispatcher(const Dispatcher&) = delete;
  Dispatcher& operator=(const Dispatcher&) = delete;
  ~Dispatcher() { shutdown(); }

  /// terminate(), then runs the callbacks still queued (error_callbacks of
  /// what terminate() failed among them) and ends the callback thread. Called
  /// by ~Pool while the Pool is whole, so a callback may still use it.
  void shutdown() noexcept {
    terminate();
    runner_.stop();
  }

  std::size_t processes() const { return processes_; }

  /// An empty task frame to encode a chunk into: once large, it grows in the
  /// pool's shared memory, where the worker will read it.
  TaskBytes new_frame() const { return TaskBytes(TaskAllocator<char>(task_memory_)); }

  /// Most tasks a worker may hold at once (Options::max_tasks_in_flight).
  std::size_t max_tasks_per_worker() const { return max_in_flight_; }

  /**
   * For a call that submits its chunks in several batches: once it has
   * opened a stream, close() refuses none of its later batches (submitted
   * with `in_stream`), and the pool does not wind down before it is closed.
   * Every open_stream() needs its close_stream().
   */
  void open_stream() {
    std::lock_guard lock(mutex_);
    if (state_ != State::running) throw_not_running();
    ++streams_;
  }
  void close_stream() noexcept {
    bool last_on_closed_pool;
    {
      std::lock_guard lock(mutex_);
      last_on_closed_pool = --streams_ == 0 && state_ == State::closed;
    }
    // Only a closed pool waits for its streams to wind down.
    if (last_on_closed_pool) wake();
  }

  /// Throws PoolNotRunning unless the pool takes new work.
  void require_running() {
    std::lock_guard lock(mutex_);
    if (state_ != State::running) throw_not_running();
  }

  /// Queues chunks; they are failed at once if the pool can no longer run them.
  void submit(std::vector<Chunk> chunks, bool in_stream = false) { submit_from(chunks, in_stream); }

  /// submit(), taking the chunks out of `chunks`: it is left empty, with
  /// its capacity, for a caller's next batch.
  void submit_from(std::vector<Chunk>& chunks, bool in_stream = false) {
    // Their frames' shared homes are made before taking the lock the I/O thread needs.
    std::vector<std::shared_ptr<TaskBytes>> frames;
    frames.reserve(chunks.size());
    for (auto& chunk : chunks) frames.push_back(std::make_shared<TaskBytes>(std::move(chunk.frame)));
    // Each job learns whose it is (to withdraw its tasks, to run callbacks).
    const JobState* attached = nullptr;
    for (auto& chunk : chunks) {
      if (chunk.job.get() == attached) continue;
      attached = chunk.job.get();
      chunk.job->attach(shared_from_this());
    }
    std::vector<Delivery> failed;
    {
      std::lock_guard lock(mutex_);
      if (state_ != State::running && !(in_stream && state_ == State::closed)) throw_not_running();
      for (std::size_t k = 0; k < chunks.size(); ++k) {
        Chunk& chunk = chunks[k];
        const TaskBytes& frame = *frames[k];
        if (broken_) {
          failed.push_back({std::move(chunk.job), chunk.index, failure_outcome(*broken_), items_in(frame)});
        } else if (frame.size() - frame_header_size > max_message_) {
          failed.push_back({std::move(chunk.job), chunk.index,
                            failure_outcome({ChunkFailure::Kind::protocol, 0, 0, 0,
                                             fmt::format("its task message ({} bytes) is larger than "
                                                         "Options::max_message_bytes ({})",
                                                         frame.size(), max_message_)}),
                            items_in(frame)});
        } else {
          if (chunk.job->task_timeout() && !timeouts_used_) {
            // The running tasks' start times are kept from now on.
            timeouts_used_ = true;
            for (auto& w : workers_) w->front_since = Clock::now();
          }
          pending_.push_back(
              Task{std::move(chunk.job), chunk.index, 0, std::move(frames[k]), 0, {}, std::move(chunk.shares)});
        }
      }
    }
    chunks.clear();
    deliver_all(failed);
    wake();
  }

  /// Withdraws `job`'s chunks no worker has started: from the queue, and
  /// from the workers holding them (their claims taken back). They are
  /// neither run nor delivered. Returns how many.
  std::size_t withdraw(const JobState& job) override {
    std::lock_guard lock(mutex_);
    std::size_t withdrawn = 0;
    for (std::size_t k = pending_.size(); k-- > 0;) {
      if (pending_[k].job.get() != &job) continue;
      pending_.erase(k);
      ++withdrawn;
    }
    for (auto& w : workers_) {
      if (!w->claiming || w->exited) continue;
      for (std::size_t k = w->held.size(); k-- > 0;) {
        if (w->held[k].job.get() != &job || !w->claims.revoke(w->held[k].id)) continue;
        w->held.erase(k);
        ++withdrawn;
        if (k == 0) w->front_since = Clock::now();  // the next one's clock starts now, near enough
      }
    }
    if (withdrawn != 0) wake();  // a worker may now have nothing left to do
    return withdrawn;
  }

  /// Runs `work` on the pool's callback thread; false if that cannot start.
  bool post_callback(std::function<void()> work) override {
    try {
      runner_.post(std::move(work));
      return true;
    } catch (const std::exception&) {
      return false;
    }
  }

  /// No more submissions; queued work still runs.
  void close() {
    {
      std::lock_guard lock(mutex_);
      if (state_ == State::running) state_ = State::closed;
    }
    wake();
  }

  /// After close(): waits for all queued work, then for every worker to exit.
  void join() {
    {
      std::lock_guard lock(mutex_);
      if (state_ == State::running) {
        throw PoolNotRunning("procpool: join() called on a running pool; call close() or terminate() first");
      }
    }
    std::lock_guard join_lock(join_mutex_);
    thread_.join();
    // Every worker has exited: what they printed is in the relay's pipes.
    if (relay_) relay_->finish(std::chrono::seconds(1), std::chrono::seconds(5));
    // And every callback has run (but the one calling join(), if one is).
    runner_.drain();
  }

  /// Stops the workers now (SIGTERM, then SIGKILL after a short grace) and
  /// fails every unfinished task. Never throws, never hangs.
  void terminate() noexcept {
    {
      std::lock_guard lock(mutex_);
      if (state_ != State::stopped) state_ = State::terminating;
    }
    wake();
    std::lock_guard join_lock(join_mutex_);
    thread_.join();
    stop_workers();
    if (relay_) relay_->finish(kill_grace, kill_grace);
  }

 private:
  enum class State { running, closed, terminating, stopped };

  [[noreturn]] static void throw_not_running() {
    throw PoolNotRunning("procpool: the pool is closed or terminated; it accepts no new work");
  }

  struct Delivery {
    std::shared_ptr<JobState> job;
    std::uint64_t chunk;
    ChunkOutcome outcome;
    std::size_t items;  // in the chunk, for progress reports
  };

  /// Hands each job all its outcomes at once, in the order they came (one
  /// lock and at most one wake-up per job), outside the dispatcher's lock;
  /// empties `deliveries`. A job with callbacks gets them on the callback
  /// thread, which runs its callbacks.
  void deliver_all(std::vector<Delivery>& deliveries) {
    for (auto run = deliveries.begin(); run != deliveries.end();) {
      const JobState* job = run->job.get();
      auto end = std::stable_partition(run, deliveries.end(), [&](const Delivery& d) { return d.job.get() == job; });
      if (job->gated()) {
        // Shared: std::function needs a copyable callable, and outcomes only move.
        auto batch =
            std::make_shared<std::vector<Delivery>>(std::make_move_iterator(run), std::make_move_iterator(end));
        try {
          runner_.post([batch] { batch->front().job->deliver(batch->begin(), batch->end()); });
        } catch (const std::exception&) {
          // No thread to be had: the callbacks run here rather than never.
          batch->front().job->deliver(batch->begin(), batch->end());
        }
      } else {
        run->job->deliver(run, end);
      }
      run = end;
    }
    deliveries.clear();
  }

  static std::size_t items_in(const TaskBytes& task_frame) { return TaskHead::count_of(task_frame); }

  /// A chunk inside the dispatcher. Its frame is kept until the result
  /// arrives, so a task a dead worker never started can be sent again.
  struct Task {
    std::shared_ptr<JobState> job;
    std::uint64_t chunk = 0;
    std::uint64_t id = 0;  // its task id, once sent
    std::shared_ptr<TaskBytes> frame;
    std::size_t attempts = 0;  // how often a worker died running it
    ShmLease shm;         // the shared memory a frame on the heap was copied into, until the worker is done with it
    SharedStates shares;  // the SharedMemory blocks the frame refers to
  };

  /// One worker process. A slot (0 .. processes-1) has one worker taking
  /// tasks, plus, while it finishes its last maxtasksperchild tasks, the one
  /// it replaces: replacements start before the old worker exits.
  struct Worker {
    std::size_t slot = 0;
    LaunchedWorker proc;
    bool started = false;        // it reached procpool's worker loop (before its initializer)
    bool ready = false;          // it finished its initializer
    bool shm = false;            // it can reach the pool's shared memory (said so when ready)
    ShmReader shm_reader{true};  // its result buffers it announced, mapped
    SharedStates shared;         // SharedMemory blocks it shared (shm_share) for its next result
    std::string share_failure;   // why one of them could not be mapped
    bool shm_refused = false;    // one of them could not be mapped: it was told to stop (shm_off)
    bool retiring = false;       // it was sent its last task
    bool eof = false;            // its result pipe is closed
    bool exited = false;         // its process is gone (pidfd fired, or found by waitpid)
    Ring<Task> held;             // the tasks sent and not answered, in order: the front one runs
    std::size_t sent = 0;
    Outbox outbox;
    ClaimArea claims;           // the claim words of its tasks (claims.hpp)
    bool claiming = false;      // it said (when ready) that it claims each task: tasks may be taken back
    bool stalled = false;       // tasks queued on it were taken back: it gets no more until it answers one
    std::uint64_t last_id = 0;  // the id (sequence number) of the last task sent to it
    Inbox inbox;
    std::optional<ChunkFailure> failure;             // why its running task fails, if not a plain death
    std::optional<int> status;                       // wait status, once reaped
    bool leaving = false;                            // it said it exits before its queued tasks (memory cap)
    Clock::time_point front_since{};                 // when held.front() started, near enough
    std::optional<Clock::time_point> kill_at;        // SIGKILL then, after a SIGTERM for a timeout
    std::optional<Clock::time_point> partial_since;  // it sent part of a message, and nothing more since then

    bool takes_tasks() const { return !retiring && !leaving && !eof && !exited && !failure && proc.task; }
  };

  static ChunkOutcome failure_outcome(ChunkFailure failure) {
    ChunkOutcome outcome;
    outcome.rare_part().failure = std::move(failure);
    return outcome;
  }

  void wake() {
    std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_.get(), &one, sizeof(one));
  }

  // ---- the I/O thread -------------------------------------------------------

  void io_loop() {
    enum Role { result, task, death };
    std::vector<pollfd> fds;
    std::vector<std::pair<Worker*, Role>> owners;
    std::vector<Delivery> deliveries;
    std::unique_lock lock(mutex_);
    for (;;) {
      if (state_ == State::terminating) break;
      maintain(deliveries);
      // With no workers, no task is held.
      if (state_ == State::closed && streams_ == 0 && pending_.empty() && workers_.empty()) {
        break;
      }

      fds.assign(1, {wake_.get(), POLLIN, 0});
      owners.assign(1, {nullptr, death});
      bool need_timeout = false;
      auto next_deadline = enforce_timeouts();
      if (start_failure_ && !broken_ && (state_ == State::running || state_ == State::closed)) {
        next_deadline = next_deadline ? std::min(*next_deadline, next_start_) : next_start_;
      }
      for (auto& w : workers_) {
        if (!w->eof && w->proc.result) {
          fds.push_back({w->proc.result.get(), POLLIN, 0});
          owners.push_back({w.get(), result});
        }
        if (!w->outbox.empty() && w->proc.task) {
          fds.push_back({w->proc.task.get(), POLLOUT, 0});
          owners.push_back({w.get(), task});
        }
        if (w->proc.pidfd) {
          fds.push_back({w->proc.pidfd.get(), POLLIN, 0});
          owners.push_back({w.get(), death});
        } else {
          need_timeout = true;
        }
      }
      lock.unlock();
      deliver_all(deliveries);
      int timeout_ms = need_timeout ? 50 : -1;
      // Idle shared buffers are let go of after a while, busy or not.
      if (!task_memory_->empty()) timeout_ms = timeout_ms < 0 ? 1000 : std::min(timeout_ms, 1000);
      if (next_deadline) {
        auto until = std::chrono::ceil<std::chrono::milliseconds>(*next_deadline - Clock::now()).count();
        int ms = static_cast<int>(std::clamp<long long>(until, 0, 60'000));
        timeout_ms = timeout_ms < 0 ? ms : std::min(timeout_ms, ms);
      }
      int ready = retry_eintr([&] { return ::poll(fds.data(), fds.size(), timeout_ms); });
      lock.lock();
      if (!task_memory_->empty()) {
        const auto now = Clock::now();
        if (now >= next_trim_) {
          task_memory_->trim(now - ShmWriter::keep_idle_for);
          next_trim_ = now + std::chrono::milliseconds(500);
        }
      }
      if (ready < 0) continue;
      if (fds[0].revents != 0) {
        std::uint64_t drained;
        [[maybe_unused]] auto n = ::read(wake_.get(), &drained, sizeof(drained));
      }
      for (std::size_t k = 1; k < fds.size(); ++k) {
        if (fds[k].revents == 0) continue;
        auto [w, role] = owners[k];
        if (role == result) {
          // A hang-up: the worker is gone or going; read to the end, so it is taken for that before any refill.
          const bool hung_up = (fds[k].revents & (POLLHUP | POLLERR)) != 0;
          if (!read_results(*w, deliveries, hung_up)) w->eof = true;
          // Refill it at once: its next tasks leave before the other
          // workers' results are read and before this one's are delivered.
          if (!broken_ && w->takes_tasks()) {
            assign_pending();
            rebalance();
            if (!w->outbox.empty()) flush_outbox(*w);
          }
        } else if (role == task) {
          flush_outbox(*w);
        } else {
          w->exited = true;
        }
      }
      if (need_timeout) {
        // No pidfd on this kernel: look for exited workers by waitpid.
        for (auto& w : workers_) {
          if (w->proc.pidfd || w->exited) continue;
          w->status = launcher_->try_reap(w->proc);
          if (w->status) w->exited = true;
        }
      }
    }
    const bool terminating = state_ == State::terminating;
    lock.unlock();
    deliver_all(deliveries);
    if (terminating) stop_workers();
    // Every worker is gone: so is the fork server, which reaps its last
    // workers before it exits. Here, on the thread that started it: its
    // parent-death signal fires when this thread ends.
    launcher_->shutdown();
  }

  /// Bookkeeping after any event: bury the dead, start replacements, hand out
  /// work, and let workers go when the pool is closing. Called with mutex_ held.
  void maintain(std::vector<Delivery>& deliveries) {
    for (std::size_t i = 0; i < workers_.size();) {
      if (workers_[i]->exited) {
        bury(*workers_[i], deliveries);
        workers_.erase(workers_.begin() + static_cast<std::ptrdiff_t>(i));
      } else {
        ++i;
      }
    }
    // Two rounds: a worker sent its last task in the first round gets its
    // replacement in the second, so the replacement starts while it works.
    for (int round = 0; round < 2; ++round) {
      start_missing_workers(deliveries);
      if (broken_) fail_all_pending(*broken_, deliveries);
      // Tasks no worker can take while workers cannot be started fail now,
      // with the reason; the pool goes on trying to start workers.
      if (start_failure_ && start_failures_ >= 2 && !pending_.empty() && !any_worker_will_take_tasks()) {
        fail_all_pending(*start_failure_, deliveries);
      }
      assign_pending();
    }
    rebalance();
    for (auto& w : workers_) {
      if (!w->outbox.empty()) flush_outbox(*w);
      // A retiring worker whose last tasks were taken back elsewhere (or
      // ran) has nothing more to do: closing its task pipe ends it.
      if (w->retiring && w->held.empty() && w->outbox.empty()) w->proc.task.reset();
    }
    if (state_ == State::closed && streams_ == 0 && pending_.empty()) {
      // Closing the task pipe is how a worker learns to exit.
      for (auto& w : workers_) {
        if (w->held.empty() && w->outbox.empty()) w->proc.task.reset();
      }
    }
  }

  /// Whether some worker takes tasks now or will once it is ready.
  bool any_worker_will_take_tasks() const {
    return std::any_of(workers_.begin(), workers_.end(), [](const auto& w) { return w->takes_tasks(); });
  }

  void start_missing_workers(std::vector<Delivery>& deliveries) {
    // The first time, every worker starts whatever the state: a pool closed
    // as soon as it is made still runs its initializer once in each worker.
    const bool first = std::exchange(first_start_, false);
    bool want = !broken_ &&
                (first || state_ == State::running || (state_ == State::closed && (streams_ > 0 || !pending_.empty())));
    if (!want) return;
    // After a failed start, wait for the backoff unless tasks have nowhere to
    // go and have waited for one attempt already.
    if (start_failure_ && Clock::now() < next_start_ &&
        (start_failures_ < 2 || pending_.empty() || any_worker_will_take_tasks())) {
      return;
    }
    for (std::size_t slot = 0; slot < processes_ && !broken_; ++slot) {
      std::size_t in_slot = 0;
      bool covered = false;
      for (auto& w : workers_) {
        if (w->slot != slot) continue;
        ++in_slot;
        // A dying worker is buried before it is replaced; only one finishing
        // its last tasks gets its successor early.
        covered = covered || !w->retiring;
      }
      // At most two processes a slot: the one finishing up and its successor.
      if (!covered && in_slot < 2 && !start_worker(slot, deliveries)) return;
    }
  }

  /// Starts a worker in `slot`; false if it could not be started (then
  /// start_failure_ says why and next_start_ when to try again).
  bool start_worker(std::size_t slot, std::vector<Delivery>& deliveries) {
    (void)deliveries;
    auto w = std::make_unique<Worker>();
    w->inbox = Inbox(max_message_);
    w->slot = slot;
    try {
      // Slots for every task a worker may hold, twice over (claims.hpp). Where
      // there is no memfd to be had the worker runs without: its queued tasks
      // then cannot be taken back.
      try {
        w->claims = ClaimArea::create(4 * std::min<std::size_t>(max_in_flight_, std::size_t{1} << 16) + 8);
      } catch (const std::system_error&) {
      }
      std::optional<OutputRelay::Pipes> output;
      if (relay_) output = OutputRelay::open();
      w->proc = launcher_->launch(output ? output->child() : ChildStdio{}, w->claims ? w->claims.fd() : -1);
      w->claims.release_fd();
      if (output) relay_->attach(slot, w->proc.pid, std::move(*output));
      set_nonblocking(w->proc.task.get());
      set_nonblocking(w->proc.result.get());
    } catch (const std::exception& e) {
      if (w->proc.pid > 0) {
        launcher_->kill(w->proc, SIGKILL);
        launcher_->reap(w->proc);
      }
      if (dynamic_cast<const StartRefused*>(&e) != nullptr) {
        broken_ = ChunkFailure{ChunkFailure::Kind::start_failed, 0, slot, 0,
                               fmt::format("the pool could not start worker {}: {}", slot, e.what())};
        return false;
      }
      start_failure_ =
          ChunkFailure{ChunkFailure::Kind::start_failed, 0, slot, 0,
                       fmt::format("the pool could not start worker {}: {}; it goes on trying", slot, e.what())};
      start_backoff_ = std::clamp(2 * start_backoff_, std::chrono::milliseconds(50), std::chrono::milliseconds(5000));
      next_start_ = Clock::now() + start_backoff_;
      // Tasks fail for it only once a second attempt (after the backoff)
      // failed too: a worker about to exit may free what the first lacked.
      ++start_failures_;
      return false;
    }
    start_failure_.reset();
    start_failures_ = 0;
    start_backoff_ = std::chrono::milliseconds(0);
    const ShmBuffer* probe = task_memory_->probe();
    TaskBytes config;
    WorkerConfig{.slot = slot,
                 .max_tasks = max_tasks_per_child_,
                 .initializer = init_id_,
                 .max_message = max_message_,
                 .max_rss = max_rss_,
                 .address_space_limit = address_space_limit_,
                 .shm_threshold = shm_threshold_,
                 .pool_pid = static_cast<std::int32_t>(::getpid()),
                 .probe_fd = probe != nullptr ? probe->fd.get() : -1,
                 .probe_id = probe != nullptr ? probe->id : 0,
                 .initializer_state = init_state_}
        .encode(config);
    w->outbox.push(std::make_shared<TaskBytes>(std::move(config)));
    workers_.push_back(std::move(w));
    return true;
  }

  /// A worker has exited: collect what it still sent, reap it, and settle
  /// what it held. Tasks run one after another in the order sent, so only
  /// the first it held can have started: that one fails (or is retried), the
  /// others go back to the front of the queue and run elsewhere.
  void bury(Worker& w, std::vector<Delivery>& deliveries) {
    if (!w.eof && w.proc.result) read_results(w, deliveries);  // what it sent before dying still counts
    if (w.ready && w.held.empty() && !w.failure && !w.status) {
      launcher_->release(w.proc);  // an ordinary exit (maxtasksperchild, close): no news to wait for
      return;
    }
    int status = w.status ? *w.status : launcher_->reap(w.proc);
    ChunkFailure lost = w.failure.value_or(ChunkFailure{ChunkFailure::Kind::worker_lost, w.proc.pid, w.slot, 0, {}});
    lost.wait_status = status;
    if (!w.ready && !broken_) {
      const std::string hint = launcher_->start_hint();
      const bool killed = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
      if (init_failure_) {
        broken_ = *init_failure_;
      } else if (w.started && !w.failure) {
        // It reached its loop, so it died in the initializer: that is not
        // retried (it would fail again, and again).
        broken_ = ChunkFailure{ChunkFailure::Kind::initializer, w.proc.pid, w.slot, status,
                               fmt::format("the worker {} while running it", describe_wait_status(status))};
      } else if (!hint.empty() && !w.failure && !killed) {
        // A re-run binary that never reached the loop: main() did not hand it over.
        broken_ = ChunkFailure{ChunkFailure::Kind::start_failed, w.proc.pid, w.slot, status,
                               fmt::format("worker {} (pid {}) {} before it was ready. {}", w.slot, w.proc.pid,
                                           describe_wait_status(status), hint)};
      } else if (++early_deaths_ > 3 * processes_ + 3) {
        broken_ = ChunkFailure{ChunkFailure::Kind::start_failed, w.proc.pid, w.slot, status,
                               fmt::format("workers keep dying before they are ready (the last one, pid {}, {}); "
                                           "the pool stopped replacing them",
                                           w.proc.pid, describe_wait_status(status))};
      }
    }
    if (w.ready) early_deaths_ = 0;
    const bool front_started = w.ready && !w.leaving;
    std::vector<Task> again;
    for (std::size_t k = 0; k < w.held.size(); ++k) {
      Task task = std::move(w.held[k]);
      task.shm.reset();  // the worker is gone: its buffer is free
      // Which one ran: its claim word says; without claims, only the first
      // it held can have started (tasks run in the order sent).
      const bool started = w.claiming ? w.claims.was_started(task.id) : k == 0 && front_started;
      if (started) {
        bool retry =
            lost.kind == ChunkFailure::Kind::worker_lost && task.attempts < task.job->retries().value_or(retries_);
        if (!retry) {
          deliveries.push_back({std::move(task.job), task.chunk, failure_outcome(lost), items_in(*task.frame)});
          continue;
        }
        ++task.attempts;
      }
      again.push_back(std::move(task));
    }
    w.held.clear();
    for (auto task = again.rbegin(); task != again.rend(); ++task) pending_.push_front(std::move(*task));
    if (broken_) fail_all_pending(*broken_, deliveries);
  }

  /// Stops workers whose running task has outlived Options::task_timeout:
  /// SIGTERM, then SIGKILL after a grace. Returns the next time to look again.
  std::optional<Clock::time_point> enforce_timeouts() {
    std::optional<Clock::time_point> next;
    auto sooner = [&](Clock::time_point t) { next = next ? std::min(*next, t) : t; };
    const auto now = Clock::now();
    for (auto& w : workers_) {
      if (w->exited) continue;
      if (w->partial_since && !w->eof) {
        // A worker writes each message whole; one that stops midway (a task
        // wrote to the result pipe itself) would leave its task unanswered.
        const auto deadline = *w->partial_since + stall_limit;
        if (now >= deadline) {
          protocol_violation(*w, fmt::format("the worker stopped sending in the middle of a message (nothing "
                                             "more for {} s); did the task write to the worker's result pipe?",
                                             stall_limit.count()));
          continue;
        }
        sooner(deadline);
      }
      if (w->kill_at) {
        if (now >= *w->kill_at) {
          launcher_->kill(w->proc, SIGKILL);
          w->kill_at.reset();
        } else {
          sooner(*w->kill_at);
        }
        continue;
      }
      if (!timeouts_used_ || w->held.empty() || !w->ready || w->failure) continue;
      const auto limit = w->held.front().job->task_timeout().value_or(task_timeout_);
      if (limit.count() <= 0) continue;
      if (w->claiming && !w->claims.was_started(w->held.front().id)) {
        // Not started yet (still arriving through the pipe, say): its clock
        // has not started either. Look again a little later.
        w->front_since = now;
        sooner(now + std::min<Clock::duration>(limit, std::chrono::milliseconds(10)));
        continue;
      }
      auto deadline = w->front_since + limit;
      if (now < deadline) {
        sooner(deadline);
        continue;
      }
      w->failure =
          ChunkFailure{ChunkFailure::Kind::timeout, w->proc.pid, w->slot, 0, fmt::format("{} ms", limit.count())};
      launcher_->kill(w->proc, SIGTERM);
      w->kill_at = now + kill_grace;
      sooner(*w->kill_at);
    }
    return next;
  }

  void fail_all_pending(const ChunkFailure& failure, std::vector<Delivery>& deliveries) {
    for (auto& task : pending_) {
      deliveries.push_back({std::move(task.job), task.chunk, failure_outcome(failure), items_in(*task.frame)});
    }
    pending_.clear();
  }

  /// Tasks each worker may hold: one while tasks are long (so none waits
  /// behind another on a busy worker), more while they are short.
  std::size_t window() const {
    if (!have_timing_ || task_ns_ > 1'000'000.0) return 1;
    return max_in_flight_;
  }

  void assign_pending() {
    const std::size_t limit = window();
    while (!pending_.empty()) {
      Task& task = pending_.front();
      if (task.job->cancelled()) {
        pending_.pop_front();
        continue;
      }
      Worker* best = nullptr;
      for (auto& w : workers_) {
        if (!w->takes_tasks() || w->stalled || w->held.size() >= limit || !has_claim_slot(*w)) continue;
        // The least loaded; of those, one that is ready over one still starting.
        if (best == nullptr || w->held.size() < best->held.size() ||
            (w->held.size() == best->held.size() && w->ready && !best->ready)) {
          best = w.get();
        }
      }
      if (best == nullptr) return;
      TaskHeader header;
      header.id = ++best->last_id;
      // More queued to follow this one at once: its worker may look for them before sleeping.
      if (worker_spin_ && pending_.size() > 1 && !task.job->streamed()) header.flags |= task_more_queued;
      if (best->held.empty()) best->front_since = Clock::now();
      task.id = header.id;
      if (best->claims) best->claims.offer(header.id);
      send_task(*best, task, header);
      best->held.push_back(std::move(task));
      if (max_tasks_per_child_ != 0 && ++best->sent >= max_tasks_per_child_) best->retiring = true;
      pending_.pop_front();
    }
  }

  /// Whether the worker's claim slot for its next task is free: the oldest
  /// task it holds must not share it (a task taken back and sent elsewhere
  /// again and again uses up ids while the one before it runs on).
  static bool has_claim_slot(const Worker& w) {
    return !w.claims || w.held.empty() || w.last_id + 1 - w.held.front().id < w.claims.slots();
  }

  /**
   * When a worker is idle and no task waits for one, takes back the tasks
   * queued behind another worker's running task, so they run now on the idle
   * one instead of after it: one that runs long, has stopped, loops or dies
   * never holds them. A task is taken back only if its worker has not started
   * it (ClaimArea::revoke), so it runs exactly once. With mutex_ held.
   */
  void rebalance() {
    if (!pending_.empty() || broken_) return;
    const bool idle = std::any_of(workers_.begin(), workers_.end(),
                                  [](const auto& w) { return w->ready && w->takes_tasks() && w->held.empty(); });
    if (!idle) return;
    std::vector<Task> taken;
    for (auto& w : workers_) {
      if (!w->claiming || w->held.size() < 2) continue;
      // From the back: the worker claims its tasks in order, so once one is
      // started, those before it are too.
      // The front is the one it runs (or is about to): it stays.
      const std::size_t before = taken.size();
      while (w->held.size() > 1 && w->claims.revoke(w->held[w->held.size() - 1].id)) {
        Task task = std::move(w->held[w->held.size() - 1]);
        w->held.erase(w->held.size() - 1);
        task.shm.reset();  // the copy it was sent in: the worker skips it unread
        taken.push_back(std::move(task));
      }
      if (taken.size() == before) continue;
      // Not straight back to where they waited: it gets more once it answers.
      w->stalled = true;
      std::reverse(taken.begin() + static_cast<std::ptrdiff_t>(before), taken.end());
    }
    for (auto task = taken.rbegin(); task != taken.rend(); ++task) pending_.push_front(std::move(*task));
    if (!taken.empty()) assign_pending();
  }

  /// Queues a task for its worker, after its header: the frame through
  /// shared memory if it is large (where it was encoded, TaskMemory, or else
  /// copied there now).
  void send_task(Worker& w, Task& task, const TaskHeader& header) {
    char head[task_header_size];
    header.encode(head);
    const TaskBytes& frame = *task.frame;
    // Storage over the threshold may be in shared memory (even when the frame
    // is smaller: its vector grew past it); then a reference is all it takes.
    std::vector<char> ref;
    if (w.shm && task_memory_->may_place(frame.capacity())) ref = task_memory_->reference(frame.data(), frame.size());
    if (w.shm && ref.empty() && frame.size() > shm_threshold_)
      ref = task_memory_->pass(frame.data(), frame.size(), task.shm);
    if (!ref.empty()) {
      w.outbox.push(std::make_shared<TaskBytes>(ref.begin(), ref.end()), head, sizeof(head));
      return;
    }
    w.outbox.push(task.frame, head, sizeof(head));
  }

  void flush_outbox(Worker& w) {
    // Gone (EPIPE): its death is noticed through its pidfd or EOF.
    if (w.proc.task) w.outbox.flush(w.proc.task.get());
  }

  /// Reads what the worker sent; returns false at EOF (or when the worker
  /// broke the protocol and was killed). Without `to_end`, a short read ends
  /// it: the pipe was empty, and poll() tells when there is more.
  bool read_results(Worker& w, std::vector<Delivery>& deliveries, bool to_end = true) {
    for (;;) {
      std::span<char> space = w.inbox.space();
      ssize_t n = retry_eintr([&] { return ::read(w.proc.result.get(), space.data(), space.size()); });
      if (n == 0) {
        // Without a pidfd, EOF is the death notice; with one, wait for it.
        if (!w.proc.pidfd) w.exited = true;
        return false;
      }
      if (n < 0) return errno == EAGAIN;
      w.inbox.commit(static_cast<std::size_t>(n));
      if (!parse_results(w, deliveries)) return false;
      // Part of a message is in: from now, more of it must come.
      if (w.inbox.partial()) {
        w.partial_since = Clock::now();
      } else {
        w.partial_since.reset();
      }
      if (!to_end && static_cast<std::size_t>(n) < space.size()) return true;
    }
  }

  /// Handles every complete frame in the worker's inbox; false if the worker
  /// broke the protocol (it is then killed and buried).
  bool parse_results(Worker& w, std::vector<Delivery>& deliveries) {
    for (;;) {
      FrameView frame{};
      Parse parsed = w.inbox.next(frame);
      if (parsed == Parse::need_more) {
        // A message that cannot be one of a worker's is refused at its header.
        if (auto kind = w.inbox.front_kind(); kind && !from_worker(static_cast<FrameKind>(*kind))) {
          return protocol_violation(w, fmt::format("the worker sent an unknown message kind {}", *kind));
        }
        return true;
      }
      if (parsed == Parse::too_large) {
        return protocol_violation(
            w, fmt::format("the worker sent a message of {} bytes, over Options::max_message_bytes ({})",
                           w.inbox.front_length(), max_message_));
      }
      switch (frame.kind) {
        case FrameKind::started:
          w.started = true;
          break;
        case FrameKind::ready: {
          ReadyMessage ready;
          if (!ReadyMessage::decode(frame, ready)) return protocol_violation(w, "the worker sent a malformed ready");
          w.ready = true;
          w.shm = shm_threshold_ != 0 && ready.shm;
          w.claiming = w.claims && ready.claims;
          w.front_since = Clock::now();  // its initializer's time is not its first task's
          break;
        }
        case FrameKind::result:
          if (!take_result(w, frame, nullptr, deliveries)) return false;
          break;
        case FrameKind::shm_announce:
          if (!w.shm) return protocol_violation(w, "the worker sent a shared-memory message it was not to send");
          if (!w.shm_reader.adopt(frame, w.proc.pid) && !w.shm_refused) {
            // Tell it once, so it stops waiting for us to map its buffers.
            w.shm_refused = true;
            TaskBytes off;
            encode_empty(off, FrameKind::shm_off);
            w.outbox.push(std::make_shared<TaskBytes>(std::move(off)));
          }
          break;
        case FrameKind::shm_drop:
          w.shm_reader.forget(frame);
          break;
        case FrameKind::shm_share:
          if (!take_share(w, frame)) return false;
          break;
        case FrameKind::shm_ref: {
          if (!w.shm) return protocol_violation(w, "the worker sent a shared-memory message it was not to send");
          ShmReader::Resolved resolved;
          try {
            resolved = w.shm_reader.resolve(frame, max_message_);
          } catch (const std::exception& e) {
            return protocol_violation(w, fmt::format("the worker's result in shared memory could not be read: {}",
                                                     e.what()));
          }
          if (resolved.frame.kind != FrameKind::result) {
            return protocol_violation(w, "the worker sent something other than a result through shared memory");
          }
          if (!take_result(w, resolved.frame, std::move(resolved.mapping), deliveries)) return false;
          break;
        }
        case FrameKind::leaving:
          w.leaving = true;
          break;
        case FrameKind::init_failed:
        case FrameKind::fatal: {
          std::string type, message;
          try {
            Decoder decoder(frame.data, frame.size);
            decoder(type, message);
          } catch (...) {
            type = "unknown";
          }
          ChunkFailure failure{frame.kind == FrameKind::init_failed ? ChunkFailure::Kind::initializer
                                                                    : ChunkFailure::Kind::protocol,
                               w.proc.pid, w.slot, 0, fmt::format("{}: {}", type, message)};
          if (frame.kind == FrameKind::init_failed) init_failure_ = failure;
          w.failure = failure;
          break;
        }
        default:
          return protocol_violation(w, fmt::format("the worker sent an unknown message kind {}",
                                                   static_cast<std::uint32_t>(frame.kind)));
      }
    }
  }

  /// Settles the task a result frame answers. `shared`: the mapping the frame
  /// is in, if it came through shared memory (the outcome then reads it in
  /// place and frees it for the worker once decoded).
  bool take_result(Worker& w, const FrameView& frame, std::shared_ptr<ShmMapping> shared,
                   std::vector<Delivery>& deliveries) {
    ResultHead head;
    std::span<const char> items;
    if (!ResultHead::decode(frame, head, items)) return protocol_violation(w, "the worker sent a truncated result");
    const std::uint64_t id = head.task_id, ns = head.run_ns;
    std::size_t k = 0;
    while (k < w.held.size() && w.held[k].id != id) ++k;
    if (k == w.held.size()) return protocol_violation(w, "the worker answered a task it was not given");
    Task& task = w.held[k];
    w.stalled = false;
    if (timeouts_used_) w.front_since = Clock::now();
    record_timing(ns);
    ChunkOutcome outcome;
    outcome.run_ns = ns;
    if (shared) {
      outcome.rare_part().shm = std::make_unique<ShmSlice>(std::move(shared), items.data(), items.size());
    } else {
      outcome.payload = w.inbox.take_large();  // a large result is not copied again
      if (outcome.payload.empty()) {
        outcome.copy_bytes(items.data(), items.size());
      } else {
        outcome.payload_offset = static_cast<std::size_t>(items.data() - outcome.payload.data());
      }
    }
    outcome.pid = w.proc.pid;
    outcome.worker = w.slot;
    // The blocks the result refers to, all shared for it (even those its
    // task sent: they may go with the task).
    if (!w.shared.empty() || !w.share_failure.empty()) {
      outcome.rare_part().shares = std::exchange(w.shared, {});
      outcome.rare_part().share_failure = std::exchange(w.share_failure, {});
    }
    deliveries.push_back({std::move(task.job), task.chunk, std::move(outcome), items_in(*task.frame)});
    w.held.erase(k);  // frees the task's shared memory, if it used some
    return true;
  }

  /// A SharedMemory block the worker's next result refers to: maps it now,
  /// while the worker still holds it (it waits for that), and keeps it for
  /// that result. One it cannot map is left out, and decoding the result
  /// then fails with the reason.
  bool take_share(Worker& w, const FrameView& frame) {
    ShmLocation block;
    if (!ShmLocation::decode(frame, block)) {
      return protocol_violation(w, "the worker sent a malformed shm_share message");
    }
    if (w.shared.size() >= max_shares_per_result) {
      return protocol_violation(w, "the worker shared more SharedMemory blocks than a result can hold");
    }
    const auto pid = block.pid;
    const auto fd = block.fd;
    const auto id = block.id;
    const auto size = block.size;
    if (pid != w.proc.pid) return protocol_violation(w, "the worker shared another process's memory");
    try {
      auto state = open_shared_state(pid, fd, id, size);
      state->header().mark_mapped();
      w.shared.push_back(std::move(state));
    } catch (const std::exception& e) {
      // The worker waits a while for the mark, then sends its result anyway.
      if (w.share_failure.empty()) w.share_failure = e.what();
    }
    return true;
  }

  /// Whether a worker may send messages of this kind.
  static bool from_worker(FrameKind kind) {
    switch (kind) {
      case FrameKind::started:
      case FrameKind::ready:
      case FrameKind::result:
      case FrameKind::init_failed:
      case FrameKind::fatal:
      case FrameKind::leaving:
      case FrameKind::shm_ref:
      case FrameKind::shm_announce:
      case FrameKind::shm_drop:
      case FrameKind::shm_share:
        return true;
      default:
        return false;
    }
  }

  /// How long a worker may stop in the middle of a message before it is
  /// taken for broken.
  static constexpr std::chrono::seconds stall_limit{5};

  /// SharedMemory blocks one result may refer to, at most (a bound on what a
  /// worker can make the parent hold before it sends the result).
  static constexpr std::size_t max_shares_per_result = std::size_t{1} << 20;

  bool protocol_violation(Worker& w, std::string why) {
    w.failure = ChunkFailure{ChunkFailure::Kind::protocol, w.proc.pid, w.slot, 0, std::move(why)};
    launcher_->kill(w.proc, SIGKILL);
    w.eof = true;
    w.inbox.clear();
    w.partial_since.reset();
    if (!w.proc.pidfd) w.exited = true;
    return false;
  }

  void record_timing(std::uint64_t ns) {
    constexpr double alpha = 0.2;
    task_ns_ = have_timing_ ? (1 - alpha) * task_ns_ + alpha * static_cast<double>(ns) : static_cast<double>(ns);
    have_timing_ = true;
  }

  /// Stops every worker and fails every unfinished task; on the I/O thread,
  /// so the workers' parent-death signal is still armed as a backstop.
  void stop_workers() noexcept {
    std::vector<Delivery> deliveries;
    {
      std::lock_guard lock(mutex_);
      if (state_ == State::stopped) return;
      state_ = State::stopped;
      ChunkFailure terminated{ChunkFailure::Kind::terminated, 0, 0, 0, {}};
      fail_all_pending(terminated, deliveries);
      // The tasks' frames (and shared buffers, which a worker may still be
      // reading) stay with their workers until these are gone below.
      for (auto& w : workers_) {
        for (auto& task : w->held) {
          deliveries.push_back({std::move(task.job), task.chunk, failure_outcome(terminated), items_in(*task.frame)});
        }
      }
      for (auto& w : workers_) {
        w->proc.task.reset();  // an idle worker exits on EOF at once
        launcher_->kill(w->proc, SIGTERM);
      }
      // A short grace for SIGTERM, then SIGKILL.
      auto deadline = Clock::now() + std::chrono::milliseconds(200);
      for (auto& w : workers_) {
        while (!(w->status = launcher_->try_reap(w->proc))) {
          auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
          if (left <= 0) break;
          pollfd p{w->proc.pidfd ? w->proc.pidfd.get() : -1, POLLIN, 0};
          ::poll(&p, 1, 1);
        }
      }
      for (auto& w : workers_) {
        if (w->status) continue;
        launcher_->kill(w->proc, SIGKILL);
        launcher_->reap(w->proc);
      }
      workers_.clear();
    }
    deliver_all(deliveries);
  }

  std::unique_ptr<Launcher> launcher_;
  const std::size_t processes_;
  const std::size_t max_tasks_per_child_;
  const std::size_t max_in_flight_;
  const bool worker_spin_;  // Options::worker_spin
  const std::size_t retries_;
  const std::chrono::milliseconds task_timeout_;
  bool timeouts_used_ = task_timeout_.count() > 0;  // some task has a timeout: Options' or its call's
  const std::size_t max_rss_;
  const std::size_t address_space_limit_;
  /// Between SIGTERM and SIGKILL for a task over its timeout.
  static constexpr std::chrono::milliseconds kill_grace{200};
  const std::size_t max_message_;
  // The tasks' buffers, shared with the frames that live in them (TaskBytes);
  // before the tasks, which lease them.
  std::shared_ptr<TaskMemory> task_memory_;
  std::size_t shm_threshold_;  // 0: no shared memory (none asked for, or none to be had)
  const std::uint64_t init_id_;
  const std::vector<char> init_state_;
  const SharedStates init_shares_;  // the SharedMemory blocks init_state_ refers to

  std::mutex mutex_;
  std::mutex join_mutex_;
  State state_ = State::running;
  std::size_t streams_ = 0;  // calls still submitting their batches (open_stream)
  std::vector<std::unique_ptr<Worker>> workers_;
  Ring<Task> pending_;
  std::optional<ChunkFailure> broken_;
  std::optional<ChunkFailure> init_failure_;
  std::size_t early_deaths_ = 0;
  bool first_start_ = true;                    // no worker started yet
  std::optional<ChunkFailure> start_failure_;  // the last start failed: why (cleared by the next that works)
  std::size_t start_failures_ = 0;             // failed starts in a row
  Clock::time_point next_start_{};             // when to try again after a failed start
  std::chrono::milliseconds start_backoff_{0};
  double task_ns_ = 0;
  bool have_timing_ = false;
  Clock::time_point next_trim_{};  // when to look for idle shared buffers again
  Fd wake_;
  std::unique_ptr<OutputRelay> relay_;  // only when workers' output is not inherited
  CallbackRunner runner_;               // before the I/O thread, which posts to it
  InternalThread thread_;
};

}  // namespace procpool::detail
