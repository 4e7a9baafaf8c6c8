// libFuzzer target: a JobSpec as the coordinator's CreateJob receives it over
// gRPC, i.e. protobuf wire bytes from any client, checked as
// JobManager::CreateJob does before it touches its store: ResolveJobSpec
// (defaults + validation, no base directory), then the path policy, with and
// without --allowed-paths roots. Never a crash, hang or sanitizer report;
// errors are INVALID_ARGUMENT with a message; resolving is idempotent.
#include <cstddef>
#include <cstdint>
#include <string>

#include "ftune/path_policy.h"
#include "jobspec.h"

namespace {

ftune::SpecPaths PathsOf(const ftune::v1::JobSpec& spec) {
  ftune::SpecPaths paths;
  paths.model = {"model.model_name_or_path", spec.model().model_name_or_path()};
  for (int i = 0; i < spec.dataset().data_files_size(); ++i)
    paths.inputs.push_back({"dataset.data_files", spec.dataset().data_files(i)});
  for (int i = 0; i < spec.dataset().eval_data_files_size(); ++i)
    paths.inputs.push_back({"dataset.eval_data_files", spec.dataset().eval_data_files(i)});
  paths.output_dir = {"output_dir", spec.output_dir()};
  return paths;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  ftune::v1::JobSpec spec;
  if (!spec.ParseFromArray(data, static_cast<int>(size))) return 0;
  const ftune::Status st = ftune::ResolveJobSpec(&spec);
  if (!st.ok()) {
    if (st.code() != ftune::StatusCode::kInvalidArgument || st.message().empty()) __builtin_trap();
    return 0;
  }
  const std::string once = spec.SerializeAsString();
  if (!ftune::ResolveJobSpec(&spec).ok() || spec.SerializeAsString() != once) __builtin_trap();

  static const ftune::PathPolicy* open = new ftune::PathPolicy();
  static const ftune::PathPolicy* restricted =
      new ftune::PathPolicy(*ftune::PathPolicy::Create({"/srv/models", "/srv/data"}));
  const ftune::SpecPaths paths = PathsOf(spec);
  for (const ftune::PathPolicy* policy : {open, restricted}) {
    const ftune::Status checked = policy->CheckSpec(paths, /*must_exist=*/false);
    if (!checked.ok() && checked.message().empty()) __builtin_trap();
  }
  (void)ftune::JobSpecToYaml(spec);
  return 0;
}
