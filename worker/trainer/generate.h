// Autoregressive generation on a LlamaModel: prefill the prompt into a KV
// cache, then decode one token per step until a stop id or max_new_tokens,
// with greedy choice or transformers' sampling.
//
// Greedy (temperature 0) takes the first index of the largest logit, as
// torch.argmax does, so with fp32 weights the ids are those of transformers'
// generate(do_sample=False) wherever the top two logits are not within
// rounding of each other (tests/golden/generate/).
//
// Sampling applies transformers' logits warpers in transformers' order:
// temperature (logits / T), top-k (every logit below the k-th largest set to
// -inf; ties with it kept), top-p (logits sorted ascending, softmax, cumsum;
// those whose cumulative probability is <= 1 - top_p removed, the largest
// always kept), then softmax and one multinomial draw. The draw uses a CPU
// generator seeded with `seed` and the logits copied to the CPU, so the same
// seed gives the same ids run to run and on either device type of the same
// numerics; the ids are not those of transformers' sampler (another RNG
// stream).
//
// The model runs under inference mode; nothing is recorded for autograd.
//
// Thread-safety: Generate only reads the model (ForwardCached writes only
// its own cache); a TokenSampler belongs to one sequence.
#ifndef FTUNE_WORKER_TRAINER_GENERATE_H_
#define FTUNE_WORKER_TRAINER_GENERATE_H_

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "ftune/status.h"
#include "worker/trainer/model.h"

namespace ftune::trainer {

struct SamplingOptions {
  double temperature = 0.0;  // 0: greedy; > 0: sample
  int64_t top_k = 50;        // transformers' default; 0 switches it off
  double top_p = 1.0;        // (0, 1]; 1 switches it off
  uint64_t seed = 0;
  bool greedy() const { return temperature == 0.0; }
  // Errors name the flag and the value: "--top-p (1.5) must be in (0, 1]".
  Status Validate() const;
};

// The logits after transformers' temperature, top-k and top-p warpers, -inf
// where removed: (vocab) fp32 on the CPU. For sampling and its tests.
at::Tensor WarpLogits(const at::Tensor& logits, const SamplingOptions& options);

// Picks each next id from a step's logits.
class TokenSampler {
 public:
  explicit TokenSampler(const SamplingOptions& options);
  // logits (vocab) fp32 on any device.
  int64_t Next(const at::Tensor& logits);

 private:
  SamplingOptions options_;
  at::Generator generator_;  // CPU, seeded; unused when greedy
};

struct GenerateOptions {
  int64_t max_new_tokens = 256;  // >= 1
  SamplingOptions sampling;
  // Generation ends after producing any of these (the id is kept in the
  // result, as transformers returns it).
  std::vector<int64_t> stop_ids;
};

enum class StopReason { kStopId, kMaxNewTokens };
const char* StopReasonName(StopReason reason);  // "stop_id" | "max_new_tokens"

struct GenerateResult {
  std::vector<int64_t> ids;  // generated ids, the stop id included
  StopReason stop_reason = StopReason::kMaxNewTokens;
  int64_t prompt_tokens = 0;
  // Wall time of the prefill (prompt forward and the first id) and of the
  // decode steps after it (every later id); each id is read back to the
  // host when it is produced, so these include the device's work.
  double prefill_seconds = 0;
  double decode_seconds = 0;
  // Ids produced by decode steps per second: (ids - 1) / decode_seconds.
  double DecodeTokensPerSecond() const;
};

// Generates after `prompt` (at least one id, all in the vocabulary).
// `on_token` (optional) sees each id as soon as it is known. Errors:
// INVALID_ARGUMENT for bad options or prompt ids, INTERNAL for tensor
// failures (e.g. out of device memory).
Result<GenerateResult> Generate(const LlamaModel& model, const std::vector<int64_t>& prompt,
                                const GenerateOptions& options,
                                const std::function<void(int64_t id)>& on_token = nullptr);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_GENERATE_H_
