// `ftune data ...`: local data-pipeline tools that need no coordinator.
//
//   ftune data tokenize --tokenizer DIR [--add-special-tokens]
//       stdin: one JSON string per line; stdout: one JSON array of ids per
//       line (HF tokenizer.encode(text, add_special_tokens=...).ids)
//   ftune data detokenize --tokenizer DIR [--skip-special-tokens]
//       stdin: one JSON array of ids per line; stdout: one JSON string per
//       line (HF tokenizer.decode(ids, skip_special_tokens=...))
//
//   ftune data prepare JOB.yaml [--cache-dir DIR]
//       tokenizes, masks and packs the job's dataset into cached token files
//       (worker/data/prepare.h; options from the JobSpec via
//       worker/config/run_config.h); progress on stderr, then one JSON object
//       on stdout: the token file paths, cache key, cache_hit and counts.
//       DIR defaults to $FTUNE_DATA_CACHE, else ~/.cache/ftune/data.
//   ftune data inspect FILE [--rows N] [--tokenizer DIR]
//       prints the first N (default 3) rows of a token file decoded, one
//       document per paragraph, the text the loss trains on wrapped in
//       [[ ]]; the tokenizer is the one recorded in the file unless given.
//
// DIR holds tokenizer.json (and optionally tokenizer_config.json), as in a
// Hugging Face model directory. Output is flushed per line so the commands
// work as co-processes. Exit codes: 0 ok, 2 usage error, unreadable
// tokenizer, job file or token file, or a malformed input line (the message
// names the line), 1 a dataset that cannot be prepared (the message names
// the file, line and field).
//
// Thread-safety: none needed; the CLI is single-threaded.
#ifndef FTUNE_CLI_DATA_COMMANDS_H_
#define FTUNE_CLI_DATA_COMMANDS_H_

#include <istream>
#include <ostream>
#include <string>
#include <vector>

namespace ftune::cli {

// Runs `ftune data ...`; args[0] is the program name and args[1] "data".
int RunDataCommand(const std::vector<std::string>& args, std::istream& in, std::ostream& out,
                   std::ostream& err);

}  // namespace ftune::cli

#endif  // FTUNE_CLI_DATA_COMMANDS_H_
