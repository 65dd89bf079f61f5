// A promise settled by work on a libuv worker thread, for the binding's calls that run
// long (merges, dot products, opening a GPU). CudaFailure's code reaches JS as the
// error's cudaCode; a WriteFailure is marked outputWrite: true, a Cancelled cancelled: true.
#pragma once
#include <napi.h>

#include <exception>
#include <functional>
#include <stdexcept>
#include <utility>

#include "cuda_plugin.h"

namespace della_binding {

// An output file could not be written (what the caller reports as an I/O error, not as
// a fault of the merge).
struct WriteFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The caller asked the work to stop (it reports its own cancellation).
struct Cancelled : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Settles a promise from a worker's completion. Once the environment is being torn down
// (worker.terminate(), process.exit() in a Worker) the work still completes, but JS can no
// longer run and nothing awaits the promise: node-addon-api turns the failed call into a
// C++ exception, which, escaping the completion callback, aborted the whole process. A
// failure for another reason rejects the promise with it instead.
template <class Settle>
void settle_promise(Napi::Promise::Deferred& deferred, Settle&& settle) {
  try {
    settle();
  } catch (const Napi::Error& e) {
    try {
      deferred.Reject(e.Value());
    } catch (const Napi::Error&) {
      // the environment is going away
    }
  }
}

// Runs `run` on a libuv worker thread and settles a promise with `to_js(result)`.
// `keep` holds the caller's batch object, so its buffers outlive the work.
template <class Result>
class PromiseWorker : public Napi::AsyncWorker {
 public:
  using Run = std::function<Result()>;
  using ToJs = Napi::Value (*)(Napi::Env, const Result&);

  PromiseWorker(Napi::Env env, const char* name, Napi::Object keep, Run run, ToJs to_js)
      : Napi::AsyncWorker(env, name),
        deferred_(Napi::Promise::Deferred::New(env)),
        keep_alive_(Napi::Persistent(keep)),
        run_(std::move(run)),
        to_js_(to_js) {}

  static Napi::Promise Start(Napi::Env env, const char* name, Napi::Object keep, Run run, ToJs to_js) {
    auto* w = new PromiseWorker(env, name, keep, std::move(run), to_js);
    Napi::Promise p = w->deferred_.Promise();
    w->Queue();
    return p;
  }

  void Execute() override {
    try {
      result_ = run_();
    } catch (const CudaFailure& e) {
      cuda_code_ = e.code;
      SetError(e.what());
    } catch (const WriteFailure& e) {
      write_failure_ = true;
      SetError(e.what());
    } catch (const Cancelled& e) {
      cancelled_ = true;
      SetError(e.what());
    } catch (const std::exception& e) {
      SetError(e.what());
    }
  }

  void OnOK() override {
    settle_promise(deferred_, [&] {
      keep_alive_.Reset();
      deferred_.Resolve(to_js_(Env(), result_));
    });
  }

  void OnError(const Napi::Error& e) override {
    settle_promise(deferred_, [&] {
      keep_alive_.Reset();
      Napi::Object err = e.Value();
      if (cuda_code_ != 0) err.Set("cudaCode", cuda_code_name(cuda_code_));
      if (write_failure_) err.Set("outputWrite", true);
      if (cancelled_) err.Set("cancelled", true);
      deferred_.Reject(err);
    });
  }

 private:
  Napi::Promise::Deferred deferred_;
  Napi::ObjectReference keep_alive_;
  Run run_;
  ToJs to_js_;
  Result result_;
  int cuda_code_ = 0;
  bool write_failure_ = false;
  bool cancelled_ = false;
};

}  // namespace della_binding
