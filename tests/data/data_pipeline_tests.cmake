# Included from tests/data/CMakeLists.txt: tests of worker/data's pipeline
# (ftune_data; its JobSpec mapping is tested in tests/config). Golden data: tests/golden/data/.
if(TARGET ftune_data)
  set(_data_golden_def FTUNE_DATA_GOLDEN_DIR="${PROJECT_SOURCE_DIR}/tests/golden/data")

  ftune_add_test(chat_template_test LABEL unit
    SOURCES chat_template_test.cc
    LIBS ftune_data ftune_tokenizer_test_data nlohmann_json::nlohmann_json)
  target_compile_definitions(chat_template_test PRIVATE ${_data_golden_def})

  ftune_add_test(dataset_test LABEL unit
    SOURCES dataset_test.cc
    LIBS ftune_data nlohmann_json::nlohmann_json)

  ftune_add_test(packing_golden_test LABEL unit
    SOURCES packing_golden_test.cc
    LIBS ftune_data ftune_tokenizer_test_data nlohmann_json::nlohmann_json)
  target_compile_definitions(packing_golden_test PRIVATE ${_data_golden_def})

  ftune_add_test(token_file_test LABEL unit
    SOURCES token_file_test.cc
    LIBS ftune_data ftune_tokenizer_test_data nlohmann_json::nlohmann_json)

endif()
