// The plugin as the addon uses it: dlopen() the built della_merge_cuda.so, check its
// exports and ABI version, and probe device 0. Without a GPU (or driver) the probe must
// fail cleanly with the runtime's reason; the test then exits 77 (skipped). With a GPU
// it runs a small batch through the C ABI and compares it with della::run_batch.
#include <dlfcn.h>
#include <elf.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "../src/kernels/merge_cpu.h"
#include "della_cuda_api.h"

namespace {

// The symbols a shared object defines in its dynamic symbol table (what dlsym and other
// libraries can see), read from the ELF file. Empty with *error set when unreadable.
std::vector<std::string> defined_dynamic_symbols(const char* path, std::string* error) {
  std::ifstream f(path, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  auto at = [&](uint64_t off, uint64_t n) { return off <= bytes.size() && n <= bytes.size() - off; };
  std::vector<std::string> names;
  Elf64_Ehdr eh;
  if (!at(0, sizeof eh) || std::memcmp(bytes.data(), ELFMAG, SELFMAG) != 0 || bytes[EI_CLASS] != ELFCLASS64) {
    *error = "not a 64-bit ELF file";
    return names;
  }
  std::memcpy(&eh, bytes.data(), sizeof eh);
  for (unsigned i = 0; i < eh.e_shnum; ++i) {
    Elf64_Shdr sh, strs;
    if (!at(eh.e_shoff + uint64_t(i) * sizeof sh, sizeof sh)) break;
    std::memcpy(&sh, bytes.data() + eh.e_shoff + uint64_t(i) * sizeof sh, sizeof sh);
    if (sh.sh_type != SHT_DYNSYM || sh.sh_link >= eh.e_shnum) continue;
    std::memcpy(&strs, bytes.data() + eh.e_shoff + uint64_t(sh.sh_link) * sizeof strs, sizeof strs);
    for (uint64_t off = sh.sh_offset + sizeof(Elf64_Sym); off + sizeof(Elf64_Sym) <= sh.sh_offset + sh.sh_size; off += sizeof(Elf64_Sym)) {
      Elf64_Sym sym;
      if (!at(off, sizeof sym)) break;
      std::memcpy(&sym, bytes.data() + off, sizeof sym);
      const unsigned bind = ELF64_ST_BIND(sym.st_info);
      if (sym.st_shndx == SHN_UNDEF || (bind != STB_GLOBAL && bind != STB_WEAK)) continue;
      if (!at(strs.sh_offset + sym.st_name, 1)) continue;
      names.emplace_back(bytes.data() + strs.sh_offset + sym.st_name);
    }
    return names;
  }
  *error = "no dynamic symbol table";
  return names;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: della_cuda_plugin_test PATH/della_merge_cuda.so\n");
    return 2;
  }
  void* h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    std::fprintf(stderr, "FAIL dlopen: %s\n", dlerror());
    return 1;
  }
  auto abi = reinterpret_cast<della_cuda_abi_version_fn>(dlsym(h, "della_cuda_abi_version"));
  auto probe = reinterpret_cast<della_cuda_probe_fn>(dlsym(h, "della_cuda_probe"));
  auto open = reinterpret_cast<della_cuda_open_fn>(dlsym(h, "della_cuda_open"));
  auto run = reinterpret_cast<della_cuda_run_fn>(dlsym(h, "della_cuda_run"));
  auto close = reinterpret_cast<della_cuda_close_fn>(dlsym(h, "della_cuda_close"));
  if (!abi || !probe || !open || !run || !close) {
    std::fprintf(stderr, "FAIL: missing exports\n");
    return 1;
  }
  if (abi() != DELLA_CUDA_ABI_VERSION) {
    std::fprintf(stderr, "FAIL: ABI %d, expected %d\n", abi(), DELLA_CUDA_ABI_VERSION);
    return 1;
  }
  // Nothing but the C ABI leaves the plugin: no della:: internals, no CUDA runtime, and
  // no out-of-line std:: template code (g++ 13 as nvcc's host compiler emitted weak
  // std::vector<long> destructors, which visibility alone does not hide).
  std::string elf_error;
  const std::vector<std::string> exported = defined_dynamic_symbols(argv[1], &elf_error);
  if (exported.empty()) {
    std::fprintf(stderr, "FAIL: cannot read the plugin's dynamic symbols: %s\n", elf_error.c_str());
    return 1;
  }
  for (const std::string& name : exported) {
    if (name.rfind("della_cuda_", 0) != 0) {
      std::fprintf(stderr, "FAIL: the plugin exports %s (only della_cuda_* may be exported)\n", name.c_str());
      return 1;
    }
  }
  DellaCudaDeviceInfo info;
  char err[1024] = {0};
  const int rc = probe(0, &info, err, sizeof err);
  if (rc != DELLA_CUDA_OK) {
    if (rc != DELLA_CUDA_NO_DEVICE || err[0] == 0) {
      std::fprintf(stderr, "FAIL: probe returned %d (%s), expected DELLA_CUDA_NO_DEVICE with a reason\n", rc, err);
      return 1;
    }
    // Opening must fail the same way, allocating nothing.
    DellaCudaOptions o{};
    int code = 0;
    char err2[1024] = {0};
    if (open(&o, nullptr, &code, err2, sizeof err2) != nullptr || code != DELLA_CUDA_NO_DEVICE) {
      std::fprintf(stderr, "FAIL: open without a device gave code %d (%s)\n", code, err2);
      return 1;
    }
    std::printf("SKIP: plugin loads (ABI %d); no GPU: %s\n", abi(), err);
    return 77;
  }
  std::printf("device: %s (cc %d.%d, %.1f GiB)\n", info.name, info.major, info.minor, info.total_memory / 1073741824.0);

  // A della task with long rows and a dare task, through the C ABI.
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 0.02f);
  const int64_t shapes[2][2] = {{16, 5000}, {40, 300}};
  int failures = 0;
  DellaCudaOptions o{};
  o.memory_budget = 256ull << 20;
  int code = 0;
  DellaCudaContext* ctx = open(&o, nullptr, &code, err, sizeof err);
  if (!ctx) {
    std::fprintf(stderr, "FAIL: open: %s\n", err);
    return 1;
  }
  for (int s = 0; s < 2; ++s) {
    const uint64_t N = shapes[s][0] * shapes[s][1];
    std::vector<uint16_t> base(N), e0(N), e1(N), cpu(N), gpu(N, 0xdead);
    for (uint64_t i = 0; i < N; ++i) {
      base[i] = della::f32_to_bf16(nd(rng));
      e0[i] = della::f32_to_bf16(della::bf16_to_f32(base[i]) + nd(rng));
      e1[i] = della::f32_to_bf16(della::bf16_to_f32(base[i]) + nd(rng));
    }
    della::MergeTask t;
    t.base = base.data();
    t.base_dtype = t.out_dtype = della::DType::BF16;
    t.out = cpu.data();
    t.shape = {shapes[s][0], shapes[s][1]};
    t.sparsifier = s == 0 ? della::Sparsifier::Magprune : della::Sparsifier::Random;
    t.rescale = della::Rescale::Inverse;
    t.consensus = della::Consensus::Sum;
    t.normalize = s == 0;
    t.seed = 42;
    t.tensor_id = 1234567u;
    DellaCudaExpert ce[2];
    for (int k = 0; k < 2; ++k) {
      della::ExpertInput e;
      e.data = k ? e1.data() : e0.data();
      e.dtype = della::DType::BF16;
      e.shape = t.shape;
      e.weight = 0.8f;
      e.density = 0.4;
      e.epsilon = 0.1;
      t.experts.push_back(e);
      ce[k] = DellaCudaExpert{e.data, 2, t.shape.data(), e.weight, e.density, e.epsilon, e.gamma};
    }
    std::vector<della::MergeStats> st;
    della::run_batch({t}, {}, 2, st);
    DellaCudaTask ct{};
    ct.base = base.data();
    ct.base_dtype = ct.out_dtype = 2;
    ct.out = gpu.data();
    ct.shape = t.shape.data();
    ct.rank = 2;
    ct.experts = ce;
    ct.num_experts = 2;
    ct.sparsifier = static_cast<uint32_t>(t.sparsifier);
    ct.rescale = 1;
    ct.consensus = 1;
    ct.normalize = t.normalize;
    ct.lambda = 1.0;
    ct.tensor_id = t.tensor_id;
    ct.seed = t.seed;
    uint64_t nonfinite[3], kept[2];
    DellaCudaStats cs{nonfinite, kept, 0, 0, 0, 0};
    if (run(ctx, &ct, 1, &cs, 2, err, sizeof err) != DELLA_CUDA_OK) {
      std::fprintf(stderr, "FAIL: run: %s\n", err);
      ++failures;
      continue;
    }
    if (cpu != gpu) {
      std::fprintf(stderr, "FAIL: shape %lldx%lld: GPU output differs from the CPU's\n", (long long)shapes[s][0],
                   (long long)shapes[s][1]);
      ++failures;
    }
    if (kept[0] != st[0].kept[0] || kept[1] != st[0].kept[1] || cs.numel != N || cs.out_nonfinite != st[0].out_nonfinite) {
      std::fprintf(stderr, "FAIL: stats differ\n");
      ++failures;
    }
  }
  close(ctx);
  std::printf(failures ? "cuda_plugin: FAILED\n" : "cuda_plugin: ok\n");
  return failures ? 1 : 0;
}
