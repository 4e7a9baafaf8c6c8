// Fifty malformed job specs, each with the key its error must name. Shared
// by the validation unit test and the end-to-end test that sends them
// through the CLI and the gRPC API.
#ifndef FTUNE_TESTS_COMMON_BAD_SPECS_H_
#define FTUNE_TESTS_COMMON_BAD_SPECS_H_

namespace ftune::testing {

struct BadSpec {
  const char* yaml;
  const char* key;  // must appear in some error
};

inline const BadSpec kBadSpecs[] = {
    {"", "empty"},
    {"[1, 2]", "expected a mapping"},
    {"model: /m\ndataset: {data_files: [a]\n", "not valid YAML"},
    {"dataset: {data_files: [a]}", "model.model_name_or_path"},
    {"model: {model_name_or_path: ''}\ndataset: {data_files: [a]}", "model.model_name_or_path"},
    {"model: /m", "dataset.data_files"},
    {"model: /m\ndataset: {data_files: ['']}", "dataset.data_files[0]"},
    {"model: /m\ndataset: {data_files: [a], format: csv}", "dataset.format"},
    {"model: /m\ndataset: {data_files: [a], chat_template: vicuna}", "dataset.chat_template"},
    {"model: /m\ndataset: {data_files: [a], eval_split_ratio: 1.5}", "dataset.eval_split_ratio"},
    {"model: /m\ndataset: {data_files: [a], eval_split_ratio: 0.1, eval_data_files: [b]}",
     "dataset.eval_split_ratio"},
    {"model: /m\ndataset: {data_files: [a], skip_invalid: maybe}", "dataset.skip_invalid"},
    {"model: /m\ndataset: {data_files: {x: 1}}", "dataset.data_files"},
    {"model: /m\ndataset: {data_files: [a]}\nlora: {r: -1}", "lora.r"},
    {"model: /m\ndataset: {data_files: [a]}\nlora: {r: 9999}", "lora.r"},
    {"model: /m\ndataset: {data_files: [a]}\nlora: {r: eight}", "lora.r"},
    {"model: /m\ndataset: {data_files: [a]}\nlora: {lora_alpha: -16}", "lora.lora_alpha"},
    {"model: /m\ndataset: {data_files: [a]}\nlora: {lora_dropout: 1.0}", "lora.lora_dropout"},
    {"model: /m\ndataset: {data_files: [a]}\nlora: {target_modules: [qkv_proj]}",
     "lora.target_modules[0]"},
    {"model: /m\ndataset: {data_files: [a]}\nlora: {target_modules: [q_proj, q_proj]}",
     "lora.target_modules[1]"},
    {"model: /m\ndataset: {data_files: [a]}\nlora: {rank: 8}", "lora.rank"},
    {"model: /m\ndataset: {data_files: [a]}\nquantization: {bnb_4bit_quant_type: fp4}",
     "quantization.bnb_4bit_quant_type"},
    {"model: /m\ndataset: {data_files: [a]}\nquantization: {bnb_4bit_compute_dtype: int8}",
     "quantization.bnb_4bit_compute_dtype"},
    {"model: /m\ndataset: {data_files: [a]}\nquantization: {blocksize: 100}",
     "quantization.blocksize"},
    {"model: /m\ndataset: {data_files: [a]}\nquantization: {load_in_4bit: 2}",
     "quantization.load_in_4bit"},
    {"model: /m\ndataset: {data_files: [a]}\nfsdp: {sharding_strategy: HYBRID}",
     "fsdp.sharding_strategy"},
    {"model: /m\ndataset: {data_files: [a]}\nfsdp: {sharding_strategy: FULL_SHARD, "
     "reshard_after_forward: false}",
     "fsdp.reshard_after_forward"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {learning_rate: 0}",
     "training.learning_rate"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {learning_rate: 5}",
     "training.learning_rate"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {learning_rate: fast}",
     "training.learning_rate"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {lr_scheduler_type: polynomial}",
     "training.lr_scheduler_type"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {warmup_ratio: 2}", "training.warmup_ratio"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {warmup_steps: -5}",
     "training.warmup_steps"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {max_steps: -7}", "training.max_steps"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {num_train_epochs: -1}",
     "training.num_train_epochs"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {per_device_train_batch_size: 0.5}",
     "training.per_device_train_batch_size"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {gradient_accumulation_steps: -1}",
     "training.gradient_accumulation_steps"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {max_seq_len: 4}", "training.max_seq_len"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {max_grad_norm: -1}",
     "training.max_grad_norm"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {weight_decay: -0.1}",
     "training.weight_decay"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {logging_steps: 0}",
     "training.logging_steps"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {adam_beta2: 1}", "training.adam_beta2"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {adam_epsilon: 0}", "training.adam_epsilon"},
    {"model: /m\ndataset: {data_files: [a]}\nresources: {num_ranks: -4}", "resources.num_ranks"},
    {"model: /m\ndataset: {data_files: [a]}\nresources: {num_ranks: 6, gpus_per_host: 4}",
     "resources.num_ranks"},
    {"model: /m\ndataset: {data_files: [a]}\nresources: {min_gpu_memory: lots}",
     "resources.min_gpu_memory"},
    {"model: /m\ndataset: {data_files: [a]}\nresources: {placement: random}",
     "resources.placement"},
    {"model: /m\ndataset: {data_files: [a]}\npriority: 5000", "priority"},
    {"model: /m\ndataset: {data_files: [a]}\nmax_restarts: -1", "max_restarts"},
    {"model: /m\ndataset: {data_files: [a]}\nlabels: {Team: x}", "labels"},
    {"model: /m\ndataset: {data_files: [a]}\nlabels: [a, b]", "labels"},
};

}  // namespace ftune::testing

#endif  // FTUNE_TESTS_COMMON_BAD_SPECS_H_
