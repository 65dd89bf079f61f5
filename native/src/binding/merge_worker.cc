#include "merge_worker.h"

#include <string>
#include <vector>

#include "../kernels/merge_cpu.h"
#include "args.h"
#include "cuda_plugin.h"
#include "file_row_sink.h"
#include "mapped_file.h"
#include "promise_worker.h"
#include "della/philox.h"
#include "della/tensor_rules.h"

namespace della_binding {
namespace {

using della::CopyTask;
using della::MergeStats;
using della::MergeTask;

uint64_t numel_of(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

della::DType dtype_field(const Napi::Object& o, const char* key, const std::string& where) {
  return static_cast<della::DType>(integer_field(o, key, where, 0, 3));
}

void need_bytes(Napi::Env env, const ByteSpan& b, uint64_t want, const std::string& what, bool exact) {
  if (exact ? b.length != want : b.length < want)
    throw Napi::RangeError::New(env, what + " has " + std::to_string(b.length) + " bytes; its shape and dtype need " +
                                         std::to_string(want));
}

// `sinks` keeps the file outputs' sinks alive while the kernels run; they watch `cancel`.
MergeTask parse_merge(const Napi::Object& o, const std::string& where, MapHolds& holds,
                      std::vector<std::shared_ptr<della::RowSink>>& sinks, const uint8_t* cancel) {
  Napi::Env env = o.Env();
  MergeTask t;
  t.shape = shape_field(o, "shape", where);
  const uint64_t numel = numel_of(t.shape);
  t.base_dtype = dtype_field(o, "baseDtype", where);
  t.linear = field(o, "base", where).IsNull();  // null: a plain weighted combination
  if (!t.linear) {
    const ByteSpan base = input_field(o, "base", where, holds);
    need_bytes(env, base, numel * della::dtype_size(t.base_dtype), where + ".base", true);
    t.base = base.data;
  }
  t.out_dtype = dtype_field(o, "outDtype", where);
  const uint64_t out_bytes = numel * della::dtype_size(t.out_dtype);
  Napi::Value name = field(o, "name", where);
  if (!name.IsString()) throw Napi::TypeError::New(env, where + ".name must be a string");
  const std::string utf8 = name.As<Napi::String>().Utf8Value();
  t.tensor_id = della::fnv1a32(reinterpret_cast<const unsigned char*>(utf8.data()), utf8.size());
  Napi::Value out_value = field(o, "out", where);
  if (out_value.IsObject() && !out_value.IsTypedArray() && !out_value.IsDataView()) {
    // { file, offset, buffer }: written to the file slab by slab (file_row_sink.h)
    sinks.push_back(file_row_sink_field(out_value.As<Napi::Object>(), where + ".out",
                                        della::geometry(t.shape).n * della::dtype_size(t.out_dtype), out_bytes, utf8,
                                        cancel));
    t.sink = sinks.back().get();
  } else {
    const ByteSpan out = bytes_field(o, "out", where);
    need_bytes(env, out, out_bytes, where + ".out", true);
    t.out = out.data;
  }
  t.sparsifier = static_cast<della::Sparsifier>(integer_field(o, "sparsifier", where, 0, 4));
  t.rescale = static_cast<della::Rescale>(integer_field(o, "rescale", where, 0, 4));
  t.consensus = static_cast<della::Consensus>(integer_field(o, "consensus", where, 0, 2));
  t.normalize = bool_field(o, "normalize", where);
  t.lambda = number_field(o, "lambda", where);
  t.seed = static_cast<uint64_t>(integer_field(o, "seed", where, 0, 9007199254740991.0));
  Napi::Array experts = array_field(o, "experts", where);
  for (uint32_t k = 0; k < experts.Length(); ++k) {
    const std::string ew = where + ".experts[" + std::to_string(k) + "]";
    Napi::Value ev = experts.Get(k);
    if (!ev.IsObject()) throw Napi::TypeError::New(env, ew + " must be an object");
    Napi::Object e = ev.As<Napi::Object>();
    della::ExpertInput in;
    in.shape = shape_field(e, "shape", ew);
    in.dtype = dtype_field(e, "dtype", ew);
    const ByteSpan data = input_field(e, "data", ew, holds);
    need_bytes(env, data, numel_of(in.shape) * della::dtype_size(in.dtype), ew + ".data", true);
    in.data = data.data;
    in.weight = static_cast<float>(number_field(e, "weight", ew));
    in.density = number_field(e, "density", ew);
    in.epsilon = number_field(e, "epsilon", ew);
    in.gamma = number_field(e, "gamma", ew);
    t.experts.push_back(std::move(in));
  }
  try {
    della::validate_task(t);
  } catch (const std::exception& err) {
    throw Napi::RangeError::New(env, where + ": " + err.what());
  }
  return t;
}

Napi::Array numbers(Napi::Env env, const std::vector<uint64_t>& xs) {
  Napi::Array a = Napi::Array::New(env, xs.size());
  for (size_t i = 0; i < xs.size(); ++i) a.Set(i, Napi::Number::New(env, static_cast<double>(xs[i])));
  return a;
}

Napi::Value merge_stats_to_js(Napi::Env env, const std::vector<MergeStats>& stats) {
  Napi::Array out = Napi::Array::New(env, stats.size());
  for (size_t i = 0; i < stats.size(); ++i) {
    Napi::Object s = Napi::Object::New(env);
    s.Set("nonfinite", numbers(env, stats[i].nonfinite));
    s.Set("kept", numbers(env, stats[i].kept));
    s.Set("outNonfinite", Napi::Number::New(env, static_cast<double>(stats[i].out_nonfinite)));
    s.Set("numel", Napi::Number::New(env, static_cast<double>(stats[i].numel)));
    if (stats[i].has_digest) s.Set("xxh64", hex64(env, stats[i].digest));
    out.Set(i, s);
  }
  return out;
}

Napi::Value dot_stats_to_js(Napi::Env env, const std::vector<della::DotStats>& stats) {
  Napi::Array out = Napi::Array::New(env, stats.size());
  for (size_t i = 0; i < stats.size(); ++i) {
    Napi::Object s = Napi::Object::New(env);
    s.Set("dot", stats[i].dot);
    s.Set("aa", stats[i].aa);
    s.Set("bb", stats[i].bb);
    s.Set("nonfinite", numbers(env, {stats[i].nonfinite_a, stats[i].nonfinite_b}));
    out.Set(i, s);
  }
  return out;
}

}  // namespace

// dotBatch({ threads, tasks: [{ a, aDtype, b, bDtype, shape }] }) -> Promise<[{ dot, aa, bb, nonfinite }]>
Napi::Value DotBatch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "dotBatch(batch) takes an object");
  Napi::Object batch = info[0].As<Napi::Object>();
  const unsigned threads = static_cast<unsigned>(integer_field(batch, "threads", "batch", 1, 1024));
  MapHolds holds;
  std::vector<della::DotTask> tasks;
  Napi::Array ts = array_field(batch, "tasks", "batch");
  for (uint32_t i = 0; i < ts.Length(); ++i) {
    const std::string where = "tasks[" + std::to_string(i) + "]";
    Napi::Value v = ts.Get(i);
    if (!v.IsObject()) throw Napi::TypeError::New(env, where + " must be an object");
    Napi::Object o = v.As<Napi::Object>();
    della::DotTask t;
    t.shape = shape_field(o, "shape", where);
    const uint64_t numel = numel_of(t.shape);
    t.a_dtype = dtype_field(o, "aDtype", where);
    t.b_dtype = dtype_field(o, "bDtype", where);
    const ByteSpan a = input_field(o, "a", where, holds), b = input_field(o, "b", where, holds);
    need_bytes(env, a, numel * della::dtype_size(t.a_dtype), where + ".a", true);
    need_bytes(env, b, numel * della::dtype_size(t.b_dtype), where + ".b", true);
    t.a = a.data;
    t.b = b.data;
    tasks.push_back(std::move(t));
  }
  return PromiseWorker<std::vector<della::DotStats>>::Start(
      env, "della-merge:dotBatch", batch,
      [tasks = std::move(tasks), threads, holds = std::move(holds)] {
        std::vector<della::DotStats> stats;
        della::run_dots(tasks, threads, stats);
        return stats;
      },
      dot_stats_to_js);
}

// mergeBatch({ threads, merges: [...], copies: [{ src, dst }], cuda?: { device, memory }, digests?: bool, cancel?: Uint8Array })
//   -> Promise<stats[]>
// A merge's `out` is a typed array, or { file: OutputFile, offset, buffer } to write it
// to the file slab by slab through `buffer` (two slabs); a failed write rejects with an
// error marked outputWrite: true. `cancel`, a Uint8Array, stops such a merge before its
// next slab once its first byte is set (rejected, marked cancelled: true).
// With `cuda` the merges run in the CUDA plugin (copies stay on the CPU threads). With
// `digests` the CPU kernels also hash each merge's output (stats[i].xxh64).
Napi::Value MergeBatch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "mergeBatch(batch) takes an object");
  Napi::Object batch = info[0].As<Napi::Object>();
  const unsigned threads = static_cast<unsigned>(integer_field(batch, "threads", "batch", 1, 1024));
  MapHolds holds;
  std::vector<MergeTask> merges;
  std::vector<std::shared_ptr<della::RowSink>> sinks;
  const uint8_t* cancel = nullptr;
  if (batch.Has("cancel") && !batch.Get("cancel").IsUndefined()) {
    ByteSpan flag{};
    if (!byte_view(batch.Get("cancel"), flag) || flag.length < 1)
      throw Napi::TypeError::New(env, "batch.cancel must be a Uint8Array of at least one byte");
    cancel = flag.data;
  }
  Napi::Array ms = array_field(batch, "merges", "batch");
  for (uint32_t i = 0; i < ms.Length(); ++i) {
    const std::string where = "merges[" + std::to_string(i) + "]";
    Napi::Value v = ms.Get(i);
    if (!v.IsObject()) throw Napi::TypeError::New(env, where + " must be an object");
    merges.push_back(parse_merge(v.As<Napi::Object>(), where, holds, sinks, cancel));
  }
  if (batch.Has("digests") && !batch.Get("digests").IsUndefined() && bool_field(batch, "digests", "batch"))
    for (MergeTask& t : merges) t.digest = true;
  std::vector<CopyTask> copies;
  Napi::Array cs = array_field(batch, "copies", "batch");
  for (uint32_t i = 0; i < cs.Length(); ++i) {
    const std::string where = "copies[" + std::to_string(i) + "]";
    Napi::Value v = cs.Get(i);
    if (!v.IsObject()) throw Napi::TypeError::New(env, where + " must be an object");
    const ByteSpan src = input_field(v.As<Napi::Object>(), "src", where, holds);
    const ByteSpan dst = bytes_field(v.As<Napi::Object>(), "dst", where);
    if (src.length != dst.length) throw Napi::RangeError::New(env, where + ": src and dst lengths differ");
    copies.push_back({src.data, dst.data, src.length});
  }
  int cuda_device = -1;
  uint64_t cuda_memory = 0;
  if (batch.Has("cuda") && !batch.Get("cuda").IsUndefined() && !batch.Get("cuda").IsNull()) {
    Napi::Object c = object_field(batch, "cuda", "batch");
    cuda_device = static_cast<int>(integer_field(c, "device", "batch.cuda", 0, 1024));
    cuda_memory = static_cast<uint64_t>(integer_field(c, "memory", "batch.cuda", 0, 9007199254740991.0));
    if (!sinks.empty()) throw Napi::TypeError::New(env, "batch.cuda: merges written to a file (out: { file }) run on the CPU only");
  }
  return PromiseWorker<std::vector<MergeStats>>::Start(
      env, "della-merge:mergeBatch", batch,
      [merges = std::move(merges), copies = std::move(copies), threads, cuda_device, cuda_memory, holds = std::move(holds),
       sinks = std::move(sinks)] {
        std::vector<MergeStats> stats;
        if (cuda_device < 0) {
          della::run_batch(merges, copies, threads, stats);
          return stats;
        }
        std::vector<MergeStats> none;
        if (!copies.empty()) della::run_batch({}, copies, threads, none);
        return cuda_run_batch(cuda_device, cuda_memory, merges, threads);
      },
      merge_stats_to_js);
}

}  // namespace della_binding
