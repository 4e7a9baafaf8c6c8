#include "worker/agent/nvml.h"

#include <dlfcn.h>

namespace ftune::agent {
namespace {

// From nvml.h (stable ABI since the _v2 entry points of CUDA 5.5 / R319).
using nvmlReturn_t = int;
constexpr nvmlReturn_t kNvmlSuccess = 0;
struct nvmlDevice_st;
using nvmlDevice_t = nvmlDevice_st*;
struct nvmlMemory_t {
  unsigned long long total;
  unsigned long long free;
  unsigned long long used;
};
// NVML_DEVICE_UUID_V2_BUFFER_SIZE and NVML_DEVICE_NAME_V2_BUFFER_SIZE.
constexpr unsigned kUuidBufferSize = 96;
constexpr unsigned kNameBufferSize = 96;

using InitFn = nvmlReturn_t (*)();
using ShutdownFn = nvmlReturn_t (*)();
using GetCountFn = nvmlReturn_t (*)(unsigned*);
using GetHandleFn = nvmlReturn_t (*)(unsigned, nvmlDevice_t*);
using GetStringFn = nvmlReturn_t (*)(nvmlDevice_t, char*, unsigned);
using GetMemoryFn = nvmlReturn_t (*)(nvmlDevice_t, nvmlMemory_t*);
using ErrorStringFn = const char* (*)(nvmlReturn_t);

class Library {
 public:
  explicit Library(const char* name) : handle_(dlopen(name, RTLD_NOW | RTLD_LOCAL)) {}
  ~Library() {
    if (handle_ != nullptr) dlclose(handle_);
  }
  bool loaded() const { return handle_ != nullptr; }
  template <typename Fn>
  Fn Get(const char* symbol) const {
    return reinterpret_cast<Fn>(dlsym(handle_, symbol));
  }

 private:
  void* handle_;
};

}  // namespace

bool ProbeNvmlGpus(std::vector<NvmlGpu>* gpus, std::string* error) {
  gpus->clear();
  Library lib("libnvidia-ml.so.1");
  if (!lib.loaded()) {
    const char* why = dlerror();
    *error = std::string("cannot load libnvidia-ml.so.1 (") + (why ? why : "unknown reason") +
             "): the NVIDIA driver is not installed";
    return false;
  }
  auto init = lib.Get<InitFn>("nvmlInit_v2");
  auto shutdown = lib.Get<ShutdownFn>("nvmlShutdown");
  auto get_count = lib.Get<GetCountFn>("nvmlDeviceGetCount_v2");
  auto get_handle = lib.Get<GetHandleFn>("nvmlDeviceGetHandleByIndex_v2");
  auto get_uuid = lib.Get<GetStringFn>("nvmlDeviceGetUUID");
  auto get_name = lib.Get<GetStringFn>("nvmlDeviceGetName");
  auto get_memory = lib.Get<GetMemoryFn>("nvmlDeviceGetMemoryInfo");
  auto error_string = lib.Get<ErrorStringFn>("nvmlErrorString");
  if (!init || !shutdown || !get_count || !get_handle || !get_uuid || !get_name || !get_memory) {
    *error =
        "libnvidia-ml.so.1 lacks an NVML entry point the agent needs; update the NVIDIA driver";
    return false;
  }
  auto describe = [&](const std::string& call, nvmlReturn_t rc) {
    const char* text = error_string ? error_string(rc) : nullptr;
    return call + " failed with NVML error " + std::to_string(rc) +
           (text != nullptr ? std::string(" (") + text + ")" : std::string());
  };
  nvmlReturn_t rc = init();
  if (rc != kNvmlSuccess) {
    *error = describe("nvmlInit_v2", rc) + ": check that the NVIDIA driver is loaded (nvidia-smi)";
    return false;
  }
  unsigned count = 0;
  rc = get_count(&count);
  if (rc != kNvmlSuccess) {
    *error = describe("nvmlDeviceGetCount_v2", rc);
    shutdown();
    return false;
  }
  for (unsigned i = 0; i < count; ++i) {
    nvmlDevice_t dev = nullptr;
    char uuid[kUuidBufferSize] = {0};
    char name[kNameBufferSize] = {0};
    nvmlMemory_t mem{};
    if ((rc = get_handle(i, &dev)) != kNvmlSuccess ||
        (rc = get_uuid(dev, uuid, sizeof(uuid))) != kNvmlSuccess ||
        (rc = get_name(dev, name, sizeof(name))) != kNvmlSuccess ||
        (rc = get_memory(dev, &mem)) != kNvmlSuccess) {
      *error = describe("NVML query of GPU " + std::to_string(i), rc);
      shutdown();
      gpus->clear();
      return false;
    }
    NvmlGpu gpu;
    gpu.index = static_cast<int>(i);
    gpu.uuid = uuid;
    gpu.name = name;
    gpu.memory_bytes = static_cast<int64_t>(mem.total);
    gpus->push_back(std::move(gpu));
  }
  shutdown();
  return true;
}

}  // namespace ftune::agent
