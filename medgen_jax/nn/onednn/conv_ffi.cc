// oneDNN convolutions as one XLA FFI handler (CPU): forward, input gradient
// and kernel gradient of a channels-last convolution, float32 or bfloat16.
//
// Layouts are the ones XLA hands over: activations [N, *S, C] (oneDNN's
// nwc / nhwc / ndhwc) and kernels [*k, I, O] (wio / hwio / dhwio). The
// primitives may want the kernel in a blocked layout (and, on some CPUs, the
// activations too); such operands are reordered into per-thread buffers.
// Primitives are built once per shape and kept for the process: building
// one (choosing and JIT-compiling a kernel) costs milliseconds, running one
// on a small conv about as much.
//
// Threads: the batch is split into one chunk per thread of XLA's intra-op
// pool, each chunk run by single-threaded oneDNN on a pool thread (the
// calling thread takes whatever chunks no idle pool thread has claimed).
// XLA runs independent instructions at the same time on that pool (a kernel
// gradient beside the rest of the backward pass); oneDNN's own OpenMP
// threads would then compete with XLA's for the same cores. A kernel
// gradient sums the chunks' float32 partial gradients, then rounds once.
//
// Built on first use by medgen_jax/nn/onednn/__init__.py; see there.

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum Kind : int64_t { kForward = 0, kInputGrad = 1, kKernelGrad = 2 };

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// One stream per thread: chunks run on several threads at once.
dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// Per-thread scratch memory that only grows (slot 0: the primitive's
// scratchpad, 1-3: reordered operands), 64-byte aligned.
void* Scratch(int slot, size_t bytes) {
  thread_local std::unique_ptr<char[]> bufs[4];
  thread_local size_t sizes[4] = {0, 0, 0, 0};
  if (sizes[slot] < bytes) {
    bufs[slot].reset(new char[bytes + 64]);
    sizes[slot] = bytes;
  }
  auto p = reinterpret_cast<uintptr_t>(bufs[slot].get());
  return reinterpret_cast<void*>((p + 63) & ~uintptr_t{63});
}

memory::data_type DnnlType(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return memory::data_type::f32;
    case ffi::DataType::BF16: return memory::data_type::bf16;
    default: return memory::data_type::undef;
  }
}

memory::format_tag ActTag(size_t spatial) {
  using tag = memory::format_tag;
  return spatial == 1 ? tag::nwc : spatial == 2 ? tag::nhwc : tag::ndhwc;
}

memory::format_tag KernelTag(size_t spatial) {
  using tag = memory::format_tag;
  return spatial == 1 ? tag::wio : spatial == 2 ? tag::hwio : tag::dhwio;
}

// oneDNN's logical order: activations [N, C, *S], kernels [O, I, *k].
memory::desc ActDesc(ffi::Span<const int64_t> d, int64_t batch,
                     memory::data_type t) {
  memory::dims dims = {batch, d[d.size() - 1]};
  for (size_t i = 1; i + 1 < d.size(); ++i) dims.push_back(d[i]);
  return memory::desc(dims, t, ActTag(d.size() - 2));
}

memory::desc KernelDesc(ffi::Span<const int64_t> d, memory::data_type t) {
  size_t n = d.size() - 2;
  memory::dims dims = {d[n + 1], d[n]};
  for (size_t i = 0; i < n; ++i) dims.push_back(d[i]);
  return memory::desc(dims, t, KernelTag(n));
}

memory::desc Any(const memory::desc& d) {
  return memory::desc(d.get_dims(), d.get_data_type(), memory::format_tag::any);
}

// A convolution's tensors in the layouts the caller holds them.
struct Conv {
  memory::desc src, wei, dst;
  memory::dims strides, pad_lo, pad_hi, dilation;
};

// The output tensor of `kind`'s primitive: dst, diff_src or diff_weights.
memory::desc& Output(Kind kind, Conv& c) {
  return kind == kForward ? c.dst : (kind == kInputGrad ? c.src : c.wei);
}

// One primitive with the reorders between the caller's layouts (`user`) and
// the primitive's (`want`) of its operands a, b and its output.
struct Plan {
  dnnl::primitive prim;
  int arg[3];                    // DNNL_ARG_* of a, b, out
  memory::desc user[3];
  memory::desc want[3];
  bool reorder[3];
  dnnl::reorder convert[3];      // user -> want (a, b); want -> user (out)
  size_t scratchpad_bytes;
};

dnnl::convolution_forward::primitive_desc ForwardPd(const Conv& c,
                                                    bool any_act) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, any_act ? Any(c.src) : c.src,
      Any(c.wei), any_act ? Any(c.dst) : c.dst, c.strides, c.dilation,
      c.pad_lo, c.pad_hi, attr);
}

// A plan for `user`'s tensors whose primitive computes `c` (which may hold
// the output in float32 instead of bf16: the reorder converts it).
std::unique_ptr<Plan> MakePlan(Kind kind, const Conv& user, const Conv& c,
                               bool any_act) {
  auto plan = std::make_unique<Plan>();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  // A gradient primitive takes the forward one as a hint: the user's types.
  auto fwd = ForwardPd(kind == kForward ? c : user, any_act);
  memory::desc src = any_act ? Any(c.src) : c.src;
  memory::desc dst = any_act ? Any(c.dst) : c.dst;
  if (kind == kForward) {
    plan->prim = dnnl::convolution_forward(fwd);
    plan->arg[0] = DNNL_ARG_SRC;
    plan->arg[1] = DNNL_ARG_WEIGHTS;
    plan->arg[2] = DNNL_ARG_DST;
    plan->user[0] = user.src;
    plan->user[1] = user.wei;
    plan->user[2] = user.dst;
    plan->want[0] = fwd.src_desc();
    plan->want[1] = fwd.weights_desc();
    plan->want[2] = fwd.dst_desc();
    plan->scratchpad_bytes = fwd.scratchpad_desc().get_size();
  } else if (kind == kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, src, Any(c.wei), dst,
        c.strides, c.dilation, c.pad_lo, c.pad_hi, fwd, attr);
    plan->prim = dnnl::convolution_backward_data(pd);
    plan->arg[0] = DNNL_ARG_DIFF_DST;
    plan->arg[1] = DNNL_ARG_WEIGHTS;
    plan->arg[2] = DNNL_ARG_DIFF_SRC;
    plan->user[0] = user.dst;
    plan->user[1] = user.wei;
    plan->user[2] = user.src;
    plan->want[0] = pd.diff_dst_desc();
    plan->want[1] = pd.weights_desc();
    plan->want[2] = pd.diff_src_desc();
    plan->scratchpad_bytes = pd.scratchpad_desc().get_size();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, src, Any(c.wei), dst,
        c.strides, c.dilation, c.pad_lo, c.pad_hi, fwd, attr);
    plan->prim = dnnl::convolution_backward_weights(pd);
    plan->arg[0] = DNNL_ARG_SRC;
    plan->arg[1] = DNNL_ARG_DIFF_DST;
    plan->arg[2] = DNNL_ARG_DIFF_WEIGHTS;
    plan->user[0] = user.src;
    plan->user[1] = user.dst;
    plan->user[2] = user.wei;
    plan->want[0] = pd.src_desc();
    plan->want[1] = pd.diff_dst_desc();
    plan->want[2] = pd.diff_weights_desc();
    plan->scratchpad_bytes = pd.scratchpad_desc().get_size();
  }
  for (int i = 0; i < 3; ++i) {
    plan->reorder[i] = plan->want[i] != plan->user[i];
    if (!plan->reorder[i]) continue;
    const memory::desc& from = i < 2 ? plan->user[i] : plan->want[i];
    const memory::desc& to = i < 2 ? plan->want[i] : plan->user[i];
    plan->convert[i] = dnnl::reorder(
        dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
  }
  return plan;
}

void AppendDesc(std::vector<int64_t>& key, const memory::desc& d) {
  key.push_back(static_cast<int64_t>(d.get_data_type()));
  for (auto x : d.get_dims()) key.push_back(x);
}

// Plans by kind, shapes, dtypes, stride and padding, built on first use with
// the calling thread's OpenMP thread count (1 on the chunked path) and never
// evicted: a network has a few dozen distinct convolutions.
const Plan& GetPlan(Kind kind, const Conv& c) {
  std::vector<int64_t> key = {kind, omp_get_max_threads()};
  AppendDesc(key, c.src);
  AppendDesc(key, c.wei);
  AppendDesc(key, c.dst);
  for (const auto* v : {&c.strides, &c.pad_lo, &c.pad_hi}) {
    key.insert(key.end(), v->begin(), v->end());
  }
  std::string k(reinterpret_cast<const char*>(key.data()),
                key.size() * sizeof(int64_t));
  static std::mutex mu;
  static auto* plans =
      new std::unordered_map<std::string, std::unique_ptr<Plan>>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = plans->find(k);
  if (it != plans->end()) return *it->second;
  // Preferred first: channels-last activations as given, the output in its
  // own dtype. Where oneDNN has no such kernel, it may choose the
  // activations' layout too (reordered), and a bf16 output may be computed
  // in float32 and converted.
  Conv f32_out = c;
  memory::desc& out = Output(kind, f32_out);
  out = memory::desc(out.get_dims(), memory::data_type::f32,
                     kind == kKernelGrad ? KernelTag(c.strides.size())
                                         : ActTag(c.strides.size()));
  const Conv* variants[2] = {&c, &f32_out};
  std::unique_ptr<Plan> plan;
  for (int attempt = 0; !plan; ++attempt) {
    try {
      plan = MakePlan(kind, c, *variants[attempt / 2], attempt % 2);
    } catch (const dnnl::error&) {
      if (attempt == 3) throw;
    }
  }
  return *plans->emplace(k, std::move(plan)).first->second;
}

void Reorder(const dnnl::reorder& r, const memory::desc& from, void* src,
             const memory::desc& to, void* dst) {
  memory a(from, Engine(), src), b(to, Engine(), dst);
  r.execute(Stream(), {{DNNL_ARG_FROM, a}, {DNNL_ARG_TO, b}});
}

// Runs `plan` on a, b -> out (in the user's layouts).
void Run(const Plan& plan, void* a, void* b, void* out) {
  void* ptr[3] = {a, b, out};
  std::unordered_map<int, memory> args;
  for (int i = 0; i < 3; ++i) {
    void* p = ptr[i];
    if (plan.reorder[i]) {
      p = Scratch(1 + i, plan.want[i].get_size());
      if (i < 2) {
        Reorder(plan.convert[i], plan.user[i], ptr[i], plan.want[i], p);
      }
    }
    args.emplace(plan.arg[i], memory(plan.want[i], Engine(), p));
  }
  if (plan.scratchpad_bytes) {
    memory::desc sd({static_cast<memory::dim>(plan.scratchpad_bytes)},
                    memory::data_type::u8, memory::format_tag::x);
    args.emplace(DNNL_ARG_SCRATCHPAD,
                 memory(sd, Engine(), Scratch(0, plan.scratchpad_bytes)));
  }
  plan.prim.execute(Stream(), args);
  if (plan.reorder[2]) {
    Reorder(plan.convert[2], plan.want[2],
            args.at(plan.arg[2]).get_data_handle(), plan.user[2], out);
  }
  Stream().wait();
}

// Calls fn(0..n-1) on the calling thread and on up to n - 1 threads of
// `pool`, each with one OpenMP thread. Chunks are claimed from a counter, so
// the caller finishes alone whatever no pool thread has started (no
// deadlock when the pool is busy, e.g. with other chunked calls).
// Returns the first error message, or "".
std::string ParallelFor(ffi::ThreadPool& pool, int n,
                        const std::function<void(int)>& fn) {
  struct State {
    std::atomic<int> next{0}, left{0};
    std::mutex mu;
    std::condition_variable cv;
    std::string error;
    const std::function<void(int)>* fn;
  };
  auto st = std::make_shared<State>();
  st->left = n;
  st->fn = &fn;  // only dereferenced while chunks are left, i.e. in scope
  auto work = [st, n] {
    int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    for (int i; (i = st->next.fetch_add(1)) < n;) {
      try {
        (*st->fn)(i);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(st->mu);
        if (st->error.empty()) st->error = e.what();
      }
      if (st->left.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(st->mu);
        st->cv.notify_all();
      }
    }
    omp_set_num_threads(saved);
  };
  for (int t = 1; t < n; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->left.load() == 0; });
  return st->error;
}

uint16_t ToBf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40;
  return (u + 0x7fffu + ((u >> 16) & 1)) >> 16;
}

std::string ShapeStr(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) {
    s += (i ? ", " : "") + std::to_string(d[i]);
  }
  return s + "]";
}

int64_t Product(ffi::Span<const int64_t> d, size_t from) {
  int64_t p = 1;
  for (size_t i = from; i < d.size(); ++i) p *= d[i];
  return p;
}

ffi::Error ConvImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                    ffi::Result<ffi::AnyBuffer> out, int64_t kind,
                    int64_t stride, ffi::Span<const int64_t> pad_lo,
                    ffi::Span<const int64_t> pad_hi) {
  // a, b, out: (x, kernel, y) forward; (dy, kernel, dx) input gradient;
  // (x, dy, dkernel) kernel gradient.
  if (kind < kForward || kind > kKernelGrad) {
    return ffi::Error::InvalidArgument("unknown conv kind " +
                                       std::to_string(kind));
  }
  auto k = static_cast<Kind>(kind);
  ffi::Span<const int64_t> dims[3] = {a.dimensions(), b.dimensions(),
                                      out->dimensions()};
  ffi::DataType types[3] = {a.element_type(), b.element_type(),
                            out->element_type()};
  size_t spatial = dims[0].size() - 2;
  if (spatial < 1 || spatial > 3 || dims[1].size() != spatial + 2 ||
      dims[2].size() != spatial + 2 || pad_lo.size() != spatial ||
      pad_hi.size() != spatial) {
    return ffi::Error::InvalidArgument(
        "oneDNN conv: ranks do not match: " + ShapeStr(dims[0]) + ", " +
        ShapeStr(dims[1]) + " -> " + ShapeStr(dims[2]));
  }
  for (auto t : types) {
    if (DnnlType(t) == memory::data_type::undef) {
      return ffi::Error::InvalidArgument(
          "oneDNN conv takes float32 or bfloat16 tensors");
    }
  }
  // Which buffer holds x, the kernel and y for this kind; all but the kernel
  // are batched.
  const int xi = k == kInputGrad ? 2 : 0;
  const int wi = k == kKernelGrad ? 2 : 1;
  const int yi = k == kForward ? 2 : (k == kInputGrad ? 0 : 1);
  const int64_t batch = dims[xi][0];
  // MEDGEN_JAX_ONEDNN_THREADS=omp: one call with oneDNN's own OpenMP threads
  // instead (to compare the two where the balance may differ, e.g. AMX).
  static const bool omp_threads = [] {
    const char* v = std::getenv("MEDGEN_JAX_ONEDNN_THREADS");
    return v != nullptr && std::string(v) == "omp";
  }();
  const int64_t threads = omp_threads ? 0 : pool.num_threads();
  const int chunks = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(batch, threads)));
  // A chunked kernel gradient: float32 partial sums in the kernel's layout.
  const bool partial = k == kKernelGrad && chunks > 1;
  const int64_t kernel_size = Product(dims[wi], 0);
  std::unique_ptr<float[]> partials;
  if (partial) partials.reset(new float[chunks * kernel_size]);

  auto conv_for = [&](int64_t n) {
    Conv c;
    c.src = ActDesc(dims[xi], n, DnnlType(types[xi]));
    c.wei = KernelDesc(dims[wi], partial ? memory::data_type::f32
                                         : DnnlType(types[wi]));
    c.dst = ActDesc(dims[yi], n, DnnlType(types[yi]));
    c.strides.assign(spatial, stride);
    c.dilation.assign(spatial, 0);
    c.pad_lo.assign(pad_lo.begin(), pad_lo.end());
    c.pad_hi.assign(pad_hi.begin(), pad_hi.end());
    return c;
  };
  auto run_chunk = [&](int i) {
    const int64_t q = batch / chunks, r = batch % chunks;
    const int64_t n = q + (i < r), start = i * q + std::min<int64_t>(i, r);
    void* ptr[3] = {a.untyped_data(), b.untyped_data(), out->untyped_data()};
    for (int j = 0; j < 3; ++j) {
      if (j == wi) continue;
      size_t row = Product(dims[j], 1) * ffi::ByteWidth(types[j]);
      ptr[j] = static_cast<char*>(ptr[j]) + start * row;
    }
    if (partial) ptr[wi] = partials.get() + i * kernel_size;
    Run(GetPlan(k, conv_for(n)), ptr[0], ptr[1], ptr[2]);
  };

  std::string error;
  if (threads <= 0) {
    // No pool to share (or asked not to): one call, oneDNN's own threads.
    try {
      run_chunk(0);
    } catch (const std::exception& e) {
      error = e.what();
    }
  } else {
    error = ParallelFor(pool, chunks, run_chunk);
  }
  if (error.empty() && partial) {
    for (int i = 1; i < chunks; ++i) {
      const float* p = partials.get() + i * kernel_size;
      for (int64_t j = 0; j < kernel_size; ++j) partials[j] += p[j];
    }
    if (types[wi] == ffi::DataType::F32) {
      std::memcpy(out->untyped_data(), partials.get(),
                  kernel_size * sizeof(float));
    } else {
      auto* o = static_cast<uint16_t*>(out->untyped_data());
      for (int64_t j = 0; j < kernel_size; ++j) o[j] = ToBf16(partials[j]);
    }
  }
  if (!error.empty()) {
    static const char* names[] = {"forward", "input gradient",
                                  "kernel gradient"};
    return ffi::Error::Internal(
        std::string("oneDNN conv ") + names[kind] + " of " +
        ShapeStr(dims[0]) + ", " + ShapeStr(dims[1]) + " -> " +
        ShapeStr(dims[2]) + ": " + error);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedgenOnednnConv, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("stride")
                                  .Attr<ffi::Span<const int64_t>>("pad_lo")
                                  .Attr<ffi::Span<const int64_t>>("pad_hi"));

// The oneDNN version this library runs with, and whether it can build a
// bfloat16 convolution on this CPU (for the Python side's checks).
extern "C" int MedgenOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

extern "C" int MedgenOnednnHasBf16Conv() {
  try {
    Conv c;
    c.src = memory::desc({1, 16, 4, 4}, memory::data_type::bf16,
                         memory::format_tag::nhwc);
    c.wei = memory::desc({16, 16, 3, 3}, memory::data_type::bf16,
                         memory::format_tag::hwio);
    c.dst = c.src;
    c.strides = {1, 1};
    c.dilation = {0, 0};
    c.pad_lo = {1, 1};
    c.pad_hi = {1, 1};
    ForwardPd(c, /*any_act=*/true);
    return 1;
  } catch (const dnnl::error&) {
    return 0;
  }
}
