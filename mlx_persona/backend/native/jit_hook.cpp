// MLX's kernel compiler, changed for MLX alone (Linux; mlx_persona/backend/jit.py).
//
// MLX's CPU backend fuses elementwise ops into C++ that it builds at run time: for every new kernel it
// computes <dir> = std::filesystem::temp_directory_path() / "mlx" / <version> / "cpu", dlopen()s
// <dir>/lib<name>.so if it exists, and otherwise writes <dir>/<name>.cpp and runs
//   popen("g++ -std=c++17 -O3 -Wall -fPIC -shared [-mavx2 -mfma -mf16c] \"<dir>/<name>.cpp\" -o ...")
// libmlx.so imports popen and temp_directory_path dynamically, so each call goes through one entry of
// libmlx.so's own global offset table. mlxp_jit_install() rewrites those two entries, and only those:
// - popen: a command that starts with MLX's exact compile prefix runs as `<g++> <our flags> -std=c++17
//   ...` (the flags and the compiler's absolute path come from Python, already shell-quoted); any other
//   command goes to the C library's popen unchanged;
// - temp_directory_path: returns our private kernel folder (checked by the Python side: ours, 0700).
// The process environment (PATH, TMPDIR), its children and every other library are untouched.
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>
#include <system_error>

namespace {

using popen_fn = FILE *(*)(const char *, const char *);

const char kPrefix[] = "g++ -std=c++17 -O3 -Wall -fPIC -shared";
popen_fn real_popen = nullptr;
std::string compiler;    // "<quoted g++> <quoted flags>", replaces the leading "g++"
std::string kernel_dir;  // set once, before the table entries are written
std::mutex mu;           // guards last_command and compiles (MLX compiles under its own lock, but still)
std::string last_command;
long compiles = 0;
std::string error = "not installed";

#if defined(__x86_64__)
constexpr unsigned kJumpSlot = R_X86_64_JUMP_SLOT, kGlobDat = R_X86_64_GLOB_DAT;
#elif defined(__aarch64__)
constexpr unsigned kJumpSlot = R_AARCH64_JUMP_SLOT, kGlobDat = R_AARCH64_GLOB_DAT;
#endif

FILE *hooked_popen(const char *command, const char *mode) {
  if (command && std::strncmp(command, kPrefix, sizeof(kPrefix) - 1) == 0) {
    std::string rewritten = compiler + (command + 3);  // command + 3: " -std=c++17 -O3 ..."
    {
      std::lock_guard<std::mutex> lock(mu);
      last_command = rewritten;
      ++compiles;
    }
    return real_popen(rewritten.c_str(), mode);
  }
  return real_popen(command, mode);
}

std::filesystem::path hooked_temp_directory_path() { return std::filesystem::path(kernel_dir); }

std::filesystem::path hooked_temp_directory_path_ec(std::error_code &ec) {
  ec.clear();
  return std::filesystem::path(kernel_dir);
}

struct Target {
  const char *symbol;
  void *replacement;
  int pass;  // the kernel folder first: a compiler with our flags never writes to MLX's default folder
  int found;
};

Target targets[] = {
    {"popen", reinterpret_cast<void *>(&hooked_popen), 1, 0},
    {"_ZNSt10filesystem19temp_directory_pathB5cxx11Ev", reinterpret_cast<void *>(&hooked_temp_directory_path),
     0, 0},
    {"_ZNSt10filesystem19temp_directory_pathB5cxx11ERSt10error_code",
     reinterpret_cast<void *>(&hooked_temp_directory_path_ec), 0, 0},
};
constexpr int kTargets = sizeof(targets) / sizeof(targets[0]);

struct Library {
  ElfW(Addr) base = 0;
  const ElfW(Phdr) *phdr = nullptr;
  int phnum = 0;
  std::string name;
  int matches = 0;
};

int find_library(struct dl_phdr_info *info, size_t, void *data) {
  auto *lib = static_cast<Library *>(data);
  const char *name = info->dlpi_name ? info->dlpi_name : "";
  const char *slash = std::strrchr(name, '/');
  if (std::strcmp(slash ? slash + 1 : name, "libmlx.so") != 0) return 0;
  if (lib->matches++ == 0) {
    lib->base = info->dlpi_addr;
    lib->phdr = info->dlpi_phdr;
    lib->phnum = info->dlpi_phnum;
    lib->name = name;
  }
  return 0;
}

// A dynamic-section address: glibc relocates most entries in place, but not on every platform.
ElfW(Addr) dyn_ptr(const Library &lib, ElfW(Addr) value) { return value < lib.base ? lib.base + value : value; }

struct Tables {
  const ElfW(Sym) *symtab = nullptr;
  const char *strtab = nullptr;
  const ElfW(Rela) *rela[2] = {nullptr, nullptr};
  size_t count[2] = {0, 0};
  ElfW(Addr) relro_start = 0, relro_end = 0;
};

bool read_tables(const Library &lib, Tables &t) {
  const ElfW(Dyn) *dyn = nullptr;
  for (int i = 0; i < lib.phnum; ++i) {
    const ElfW(Phdr) &p = lib.phdr[i];
    if (p.p_type == PT_DYNAMIC) dyn = reinterpret_cast<const ElfW(Dyn) *>(lib.base + p.p_vaddr);
    if (p.p_type == PT_GNU_RELRO) {
      long page = sysconf(_SC_PAGESIZE);
      t.relro_start = (lib.base + p.p_vaddr) & ~(ElfW(Addr))(page - 1);
      t.relro_end = (lib.base + p.p_vaddr + p.p_memsz) & ~(ElfW(Addr))(page - 1);
    }
  }
  if (!dyn) return false;
  long pltrel = DT_RELA;
  for (; dyn->d_tag != DT_NULL; ++dyn) {
    switch (dyn->d_tag) {
      case DT_SYMTAB: t.symtab = reinterpret_cast<const ElfW(Sym) *>(dyn_ptr(lib, dyn->d_un.d_ptr)); break;
      case DT_STRTAB: t.strtab = reinterpret_cast<const char *>(dyn_ptr(lib, dyn->d_un.d_ptr)); break;
      case DT_JMPREL: t.rela[0] = reinterpret_cast<const ElfW(Rela) *>(dyn_ptr(lib, dyn->d_un.d_ptr)); break;
      case DT_PLTRELSZ: t.count[0] = dyn->d_un.d_val / sizeof(ElfW(Rela)); break;
      case DT_PLTREL: pltrel = static_cast<long>(dyn->d_un.d_val); break;
      case DT_RELA: t.rela[1] = reinterpret_cast<const ElfW(Rela) *>(dyn_ptr(lib, dyn->d_un.d_ptr)); break;
      case DT_RELASZ: t.count[1] = dyn->d_un.d_val / sizeof(ElfW(Rela)); break;
      default: break;
    }
  }
  if (pltrel != DT_RELA) t.rela[0] = nullptr, t.count[0] = 0;  // REL tables: not on x86-64/aarch64
  return t.symtab && t.strtab;
}

// Visits every JUMP_SLOT / GLOB_DAT entry that names one of the targets; pass -1 only counts them, pass
// 0 or 1 writes the targets of that pass.
bool patch(const Library &lib, const Tables &t, int pass) {
  long page = sysconf(_SC_PAGESIZE);
  for (int table = 0; table < 2; ++table) {
    for (size_t i = 0; t.rela[table] && i < t.count[table]; ++i) {
      const ElfW(Rela) &r = t.rela[table][i];
      unsigned type = ELF64_R_TYPE(r.r_info);
      if (type != kJumpSlot && type != kGlobDat) continue;
      const char *name = t.strtab + t.symtab[ELF64_R_SYM(r.r_info)].st_name;
      for (Target &target : targets) {
        if (std::strcmp(name, target.symbol) != 0) continue;
        if (pass < 0) {
          target.found++;
          continue;
        }
        if (target.pass != pass) continue;
        auto *slot = reinterpret_cast<void **>(lib.base + r.r_offset);
        auto at = reinterpret_cast<ElfW(Addr)>(slot) & ~(ElfW(Addr))(page - 1);
        bool relro = at >= t.relro_start && at < t.relro_end;  // read-only after relocation
        if (relro && mprotect(reinterpret_cast<void *>(at), page, PROT_READ | PROT_WRITE) != 0) {
          error = std::string("mprotect failed for ") + target.symbol;
          return false;
        }
        __atomic_store_n(slot, target.replacement, __ATOMIC_SEQ_CST);
        if (relro) mprotect(reinterpret_cast<void *>(at), page, PROT_READ);
      }
    }
  }
  return true;
}

}  // namespace

extern "C" {

// Points libmlx.so's popen and temp_directory_path at the hooks above. `replacement` is the shell-quoted
// "<g++> <flags>" put in place of MLX's leading "g++"; `folder` is the kernel folder. Returns 0, or
// 1 (not x86-64/aarch64), 2 (libmlx.so is not loaded), 3 (no dynamic tables), 4 (no popen entry),
// 5 (no temp_directory_path entry), 6 (a table could not be written), 7 (installed already);
// mlxp_jit_error() says more.
int mlxp_jit_install(const char *replacement, const char *folder) {
#if !defined(__x86_64__) && !defined(__aarch64__)
  error = "not x86-64 or aarch64";
  return 1;
#else
  if (real_popen) {
    error = "installed already";
    return 7;
  }
  Library lib;
  dl_iterate_phdr(find_library, &lib);
  if (lib.matches == 0) {
    error = "libmlx.so is not loaded";
    return 2;
  }
  Tables tables;
  if (!read_tables(lib, tables)) {
    error = lib.name + ": no dynamic symbol or relocation tables";
    return 3;
  }
  patch(lib, tables, -1);
  if (!targets[0].found) {
    error = lib.name + ": imports no popen";
    return 4;
  }
  if (!targets[1].found && !targets[2].found) {
    error = lib.name + ": imports no std::filesystem::temp_directory_path";
    return 5;
  }
  real_popen = reinterpret_cast<popen_fn>(dlsym(RTLD_DEFAULT, "popen"));
  if (!real_popen) {
    error = "the C library's popen was not found";
    return 4;
  }
  compiler = replacement;
  kernel_dir = folder;
  if (!patch(lib, tables, 0)) return 6;  // nothing written yet, or only the kernel folder
  if (!patch(lib, tables, 1)) {
    error += " (the kernel folder is ours, the compiler flags are MLX's)";
    return 6;
  }
  error = "installed in " + lib.name;
  return 0;
#endif
}

const char *mlxp_jit_error(void) { return error.c_str(); }

// The last compile command MLX ran through the hook (empty if none), copied into `out`.
long mlxp_jit_last_command(char *out, long size) {
  std::lock_guard<std::mutex> lock(mu);
  if (out && size > 0) {
    std::snprintf(out, static_cast<size_t>(size), "%s", last_command.c_str());
  }
  return static_cast<long>(last_command.size());
}

long mlxp_jit_compiles(void) {
  std::lock_guard<std::mutex> lock(mu);
  return compiles;
}

}  // extern "C"
