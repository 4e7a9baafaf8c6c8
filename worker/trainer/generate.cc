// See generate.h.
#include "worker/trainer/generate.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <sstream>

namespace ftune::trainer {
namespace {

std::string Str(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

}  // namespace

Status SamplingOptions::Validate() const {
  if (!std::isfinite(temperature) || temperature < 0) {
    return InvalidArgumentError("--temperature (" + Str(temperature) +
                                ") must be >= 0 (0 means greedy)");
  }
  if (top_k < 0) {
    return InvalidArgumentError("--top-k (" + std::to_string(top_k) +
                                ") must be >= 0 (0 switches it off)");
  }
  if (!(top_p > 0.0 && top_p <= 1.0)) {
    return InvalidArgumentError("--top-p (" + Str(top_p) + ") must be in (0, 1]");
  }
  return OkStatus();
}

at::Tensor WarpLogits(const at::Tensor& logits, const SamplingOptions& options) {
  TORCH_CHECK(logits.dim() == 1 && logits.numel() >= 1, "WarpLogits: logits must be (vocab), got ",
              logits.sizes());
  const float kRemoved = -std::numeric_limits<float>::infinity();
  at::Tensor s = logits.detach().to(at::kCPU, at::kFloat).clone();  // (vocab)
  // TemperatureLogitsWarper
  if (options.temperature != 1.0) s = s / options.temperature;
  // TopKLogitsWarper: below the k-th largest value goes; ties with it stay.
  if (options.top_k > 0) {
    const int64_t k = std::min<int64_t>(options.top_k, s.numel());
    const at::Tensor kth = std::get<0>(at::topk(s, k)).select(0, k - 1);
    s = s.masked_fill(s < kth, kRemoved);
  }
  // TopPLogitsWarper: ascending order, drop the low tail whose cumulative
  // probability is <= 1 - top_p, always keep the most likely token.
  if (options.top_p < 1.0) {
    auto sorted = at::sort(s, /*dim=*/0, /*descending=*/false);
    const at::Tensor& values = std::get<0>(sorted);
    const at::Tensor& order = std::get<1>(sorted);
    at::Tensor cumulative = at::softmax(values, 0).cumsum(0);
    at::Tensor remove_sorted = cumulative <= (1.0 - options.top_p);
    remove_sorted.select(0, s.numel() - 1).fill_(false);
    at::Tensor remove = remove_sorted.scatter(0, order, remove_sorted);
    s = s.masked_fill(remove, kRemoved);
  }
  return s;
}

TokenSampler::TokenSampler(const SamplingOptions& options)
    : options_(options), generator_(at::make_generator<at::CPUGeneratorImpl>(options.seed)) {}

int64_t TokenSampler::Next(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 1, "TokenSampler: logits must be (vocab), got ", logits.sizes());
  if (options_.greedy()) return logits.argmax().item<int64_t>();
  const at::Tensor probs = at::softmax(WarpLogits(logits, options_), 0);  // (vocab) fp32 CPU
  return at::multinomial(probs, 1, /*replacement=*/false, generator_).item<int64_t>();
}

const char* StopReasonName(StopReason reason) {
  return reason == StopReason::kStopId ? "stop_id" : "max_new_tokens";
}

double GenerateResult::DecodeTokensPerSecond() const {
  if (ids.size() < 2 || decode_seconds <= 0) return 0;
  return static_cast<double>(ids.size() - 1) / decode_seconds;
}

Result<GenerateResult> Generate(const LlamaModel& model, const std::vector<int64_t>& prompt,
                                const GenerateOptions& options,
                                const std::function<void(int64_t id)>& on_token) {
  FTUNE_RETURN_IF_ERROR(options.sampling.Validate());
  if (options.max_new_tokens < 1) {
    return InvalidArgumentError("--max-new-tokens (" + std::to_string(options.max_new_tokens) +
                                ") must be >= 1");
  }
  if (prompt.empty()) return InvalidArgumentError("the prompt has no tokens");
  const LlamaConfig& config = model.config();
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= config.vocab_size) {
      return InvalidArgumentError("prompt id [" + std::to_string(i) + "] = " +
                                  std::to_string(prompt[i]) + " is outside the vocabulary [0, " +
                                  std::to_string(config.vocab_size) + ")");
    }
  }
  const int64_t num_prompt = static_cast<int64_t>(prompt.size());
  // The last id is never fed back, so the cache needs one position less.
  const int64_t positions = num_prompt + options.max_new_tokens - 1;
  if (positions > config.max_position_embeddings) {
    return InvalidArgumentError(
        "the prompt (" + std::to_string(num_prompt) + " tokens) plus --max-new-tokens (" +
        std::to_string(options.max_new_tokens) + ") exceeds the model's max_position_embeddings (" +
        std::to_string(config.max_position_embeddings) + ")");
  }
  // Attention over the whole cache: a sliding window (Mistral v0.1) would
  // have to drop keys that left it, which this path does not do.
  if (config.sliding_window && positions > *config.sliding_window) {
    return InvalidArgumentError(
        "the prompt (" + std::to_string(num_prompt) + " tokens) plus --max-new-tokens (" +
        std::to_string(options.max_new_tokens) + ") exceeds the model's sliding_window (" +
        std::to_string(*config.sliding_window) +
        "); lower --max-new-tokens or shorten the prompt");
  }
  using Clock = std::chrono::steady_clock;
  GenerateResult result;
  result.prompt_tokens = num_prompt;
  try {
    c10::InferenceMode inference;
    const c10::Device device = model.options().device;
    const auto int64 = at::TensorOptions().dtype(at::kLong);
    KvCache cache = model.NewKvCache(1, positions);
    TokenSampler sampler(options.sampling);
    const Clock::time_point start = Clock::now();
    Clock::time_point first = start;
    at::Tensor logits = model.ForwardCached(at::tensor(prompt, int64).view({1, num_prompt}).to(device),
                                            &cache)[0];  // (vocab)
    while (true) {
      const int64_t next = sampler.Next(logits);
      result.ids.push_back(next);
      if (result.ids.size() == 1) first = Clock::now();
      if (on_token) on_token(next);
      bool stop = false;
      for (int64_t id : options.stop_ids) stop = stop || id == next;
      if (stop) {
        result.stop_reason = StopReason::kStopId;
        break;
      }
      if (static_cast<int64_t>(result.ids.size()) == options.max_new_tokens) {
        result.stop_reason = StopReason::kMaxNewTokens;
        break;
      }
      logits = model.ForwardCached(at::full({1, 1}, next, int64.device(device)), &cache)[0];
    }
    const Clock::time_point end = Clock::now();
    result.prefill_seconds = std::chrono::duration<double>(first - start).count();
    result.decode_seconds = std::chrono::duration<double>(end - first).count();
  } catch (const c10::Error& e) {
    return InternalError(std::string("generate: ") + e.what_without_backtrace());
  }
  return result;
}

}  // namespace ftune::trainer
