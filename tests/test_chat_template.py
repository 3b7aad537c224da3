"""Chat templates: rendering equals transformers' apply_chat_template (text and ids), and the loss mask covers
exactly each assistant content plus its end-of-turn marker. transformers is the reference only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from conftest import SHARED_DATA, write_tiny_tokenizer
from lit_lora.data.readers import normalize_conversation
from lit_lora.errors import UserError
from lit_lora.prompts.chat_template import ChatTemplate
from lit_lora.prompts.masking import encode_conversation
from lit_lora.tokenizer import Tokenizer

TEMPLATES_DIR = SHARED_DATA / "chat_templates"

# SmolLM2-135M-Instruct's template (ChatML with a default system prompt).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Per real template: bos, eos, the special tokens it writes, the end-of-turn marker, whether it trims contents.
REAL = {
    "Qwen-Qwen2.5-7B-Instruct": dict(bos=None, eos="<|im_end|>", specials=["<|im_start|>", "<|im_end|>"],
                                     marker="<|im_end|>", trims=False, system=True),
    "google-gemma-2-2b-it": dict(bos="<bos>", eos="<eos>", specials=["<bos>", "<eos>", "<start_of_turn>",
                                                                      "<end_of_turn>"],
                                 marker="<end_of_turn>", trims=True, system=False),
    "meta-llama-Llama-3.1-8B-Instruct": dict(
        bos="<|begin_of_text|>", eos="<|eot_id|>",
        specials=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"],
        marker="<|eot_id|>", trims=True, system=True),
    "microsoft-Phi-3.5-mini-instruct": dict(
        bos="<s>", eos="<|endoftext|>", specials=["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        marker="<|end|>", trims=False, system=True),
    "mistralai-Mistral-Nemo-Instruct-2407": dict(bos="<s>", eos="</s>", specials=["<s>", "</s>", "[INST]", "[/INST]"],
                                                 marker="</s>", trims=False, system=True),
}

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris. Café au lait 🙂"},
    {"role": "user", "content": "And of Italy?\n"},
    {"role": "assistant", "content": "  Rome, of course.\n"},  # whitespace: some templates trim it, some keep it
]


@pytest.fixture(scope="module")
def base_tokenizer(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("chat") / "tiny"
    write_tiny_tokenizer(directory)
    return directory


def make_tokenizer_dir(base: Path, directory: Path, template: str, bos: str | None, eos: str,
                       specials: list[str]) -> Path:
    """The tiny tokenizer with the template's special tokens added (so each is one token) and its config."""
    tok = HFTokenizer.from_file(str(base / "tokenizer.json"))
    tok.add_special_tokens([s for s in specials + [eos] + ([bos] if bos else []) if tok.token_to_id(s) is None])
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": eos, "pad_token": eos, "add_bos_token": bos is not None,
              "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def build_case(name: str, base: Path, directory: Path) -> tuple[str, Path, dict]:
    """(name, tokenizer directory, spec) for SmolLM2's ChatML on the tiny tokenizer or a real template."""
    if name == "smollm2":
        spec = dict(bos=None, eos="<|im_end|>", specials=[], marker="<|im_end|>", trims=False, system=True)
        source = SMOLLM2
    else:
        path = TEMPLATES_DIR / f"{name}.jinja"
        if not path.is_file():
            pytest.skip(f"{path} is not present")
        spec, source = REAL[name], path.read_text(encoding="utf-8")
    return name, make_tokenizer_dir(base, directory / name, source, spec["bos"], spec["eos"], spec["specials"]), spec


@pytest.fixture(scope="module", params=["smollm2", *REAL])
def case(request, base_tokenizer, tmp_path_factory):
    return build_case(request.param, base_tokenizer, tmp_path_factory.mktemp("chat"))


def conversation(spec: dict) -> list[dict[str, str]]:
    return ([SYSTEM] if spec["system"] else []) + CHAT


def hf_tokenizer(directory: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(directory))


# --- parity with transformers -------------------------------------------------------------------------------

@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_and_ids_match_transformers(case, add_generation_prompt):
    _, directory, spec = case
    messages = conversation(spec)[:-1] if add_generation_prompt else conversation(spec)
    reference = hf_tokenizer(directory)
    tokenizer = Tokenizer(directory)
    template = ChatTemplate.from_tokenizer(tokenizer)

    text = template.render(messages, add_generation_prompt=add_generation_prompt)
    assert text == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    expected_ids = reference.apply_chat_template(messages, tokenize=True,
                                                 add_generation_prompt=add_generation_prompt)["input_ids"]
    assert tokenizer.encode(text, bos=False) == expected_ids
    if not add_generation_prompt:
        assert encode_conversation(tokenizer, template, messages).ids == expected_ids


def test_real_smollm2_tokenizer_matches_transformers():
    """The real SmolLM2 vocabulary and template, when an earlier run left the imported checkpoint in the cache
    (this test never downloads it: test_real_model.py does)."""
    from lit_lora.download import cache_dir

    directory = cache_dir() / "checkpoints" / "smollm2-135m-instruct"
    if not (directory / "tokenizer.json").is_file():
        pytest.skip("the real SmolLM2 checkpoint is not in the cache")
    tokenizer, reference = Tokenizer(directory), hf_tokenizer(directory)
    template = ChatTemplate.from_tokenizer(tokenizer)
    for messages in ([SYSTEM] + CHAT, CHAT):  # with a system prompt, and with the template's default one
        encoded = encode_conversation(tokenizer, template, messages)
        assert encoded.ids == reference.apply_chat_template(messages, tokenize=True)["input_ids"]
        runs = target_runs(tokenizer, encoded.ids, encoded.targets)
        expected = [m["content"] + "<|im_end|>" for m in CHAT[1::2]]
        # The real vocabulary merges the template's "\n" with the content's leading spaces into one token ("\n ");
        # it is a target, as in transformers' own assistant mask (the token holding the content's first character).
        assert runs[0] == expected[0] and runs[1] == "\n" + expected[1]


def test_gemma_refuses_a_system_prompt_with_its_own_message(base_tokenizer, tmp_path):
    _, directory, _ = build_case("google-gemma-2-2b-it", base_tokenizer, tmp_path)
    template = ChatTemplate.from_tokenizer(Tokenizer(directory))
    with pytest.raises(UserError, match="System role not supported"):
        template.render([SYSTEM] + CHAT)
    with pytest.raises(UserError, match="System role not supported"):
        encode_conversation(Tokenizer(directory), template, [SYSTEM] + CHAT)


def test_template_features_match_transformers(base_tokenizer):
    """Whitespace control, HF's tojson, namespace, loop controls, dict(), the generation tag, special tokens."""
    source = (
        "{%- set ns = namespace(n=0) %}\n"
        "  {% for m in messages %}\n"
        "    {% if m.role == 'system' %}{% continue %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "{{ bos_token }}[{{ ns.n }}] {{ dict(role=m.role) | tojson }}\n"
        "{{ {'t': m.content, 'k': '<&>'} | tojson(indent=2) }}\n"
        "    {% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}\n"
        "    {% endif %}\n"
        "  {% endfor %}\n"
        "{{ pad_token }}|{{ unk_token }}|{{ custom | default('none') }}"
    )
    messages = [SYSTEM] + CHAT
    reference = hf_tokenizer(base_tokenizer)
    ours = ChatTemplate.from_tokenizer(Tokenizer(base_tokenizer))
    ours = ChatTemplate(source, ours.special_tokens)
    assert ours.render(messages) == reference.apply_chat_template(messages, chat_template=source, tokenize=False)
    assert ours.render(messages, custom="x") == reference.apply_chat_template(
        messages, chat_template=source, tokenize=False, custom="x")


# --- the loss mask ------------------------------------------------------------------------------------------

def target_runs(tokenizer: Tokenizer, ids: list[int], targets: list[bool]) -> list[str]:
    """The text of each maximal run of target tokens."""
    runs, current = [], []
    for token, is_target in zip(ids, targets):
        if is_target:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special=False) for run in runs]


def expected_targets(spec: dict) -> list[str]:
    contents = [m["content"] for m in CHAT if m["role"] == "assistant"]
    return [(c.strip() if spec["trims"] else c) + spec["marker"] for c in contents]


def test_mask_covers_assistant_contents_and_end_markers(case):
    _, directory, spec = case
    tokenizer = Tokenizer(directory)
    template = ChatTemplate.from_tokenizer(tokenizer)
    encoded = encode_conversation(tokenizer, template, conversation(spec))
    assert len(encoded.targets) == len(encoded.ids)
    assert target_runs(tokenizer, encoded.ids, encoded.targets) == expected_targets(spec)
    assert encoded.end_markers == (spec["marker"], spec["marker"])


def test_mask_last_and_all(case):
    _, directory, spec = case
    tokenizer = Tokenizer(directory)
    template = ChatTemplate.from_tokenizer(tokenizer)
    last = encode_conversation(tokenizer, template, conversation(spec), train_on="last")
    assert target_runs(tokenizer, last.ids, last.targets) == expected_targets(spec)[-1:]
    everything = encode_conversation(tokenizer, template, conversation(spec), train_on="all")
    assert everything.ids == last.ids and all(everything.targets)
    with pytest.raises(UserError, match="train_on"):
        encode_conversation(tokenizer, template, conversation(spec), train_on="prompt")


def test_never_two_bos(case):
    _, directory, spec = case
    tokenizer = Tokenizer(directory)
    ids = encode_conversation(tokenizer, ChatTemplate.from_tokenizer(tokenizer), conversation(spec)).ids
    if spec["bos"] is None:
        return
    assert tokenizer.add_bos  # the checkpoint asks for BOS: only the template decides, as in transformers
    if "bos_token" in ChatTemplate.from_tokenizer(tokenizer).source:
        assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1
    else:  # Phi-3.5's template writes none, and apply_chat_template adds none either
        assert tokenizer.bos_id not in ids


def test_template_without_end_marker_says_so(base_tokenizer):
    tokenizer = Tokenizer(base_tokenizer)
    template = ChatTemplate("{% for m in messages %}{{ m.role }}:\n{{ m.content }}\n{% endfor %}")
    encoded = encode_conversation(tokenizer, template, CHAT)
    assert encoded.end_markers == (None, None)
    assert target_runs(tokenizer, encoded.ids, encoded.targets) == [m["content"] for m in CHAT[1::2]]


def test_multi_token_start_is_a_target(base_tokenizer):
    """A content glued to the template's own text: the token straddling the boundary is learnt, not lost."""
    tokenizer = Tokenizer(base_tokenizer)
    template = ChatTemplate("{% for m in messages %}{{ m.role }}: the{{ m.content }}<|im_end|>{% endfor %}")
    encoded = encode_conversation(tokenizer, template, [{"role": "user", "content": "x"},
                                                        {"role": "assistant", "content": "ory of it"}])
    runs = target_runs(tokenizer, encoded.ids, encoded.targets)
    assert len(runs) == 1 and runs[0].endswith("ory of it<|im_end|>")


@pytest.mark.parametrize("source", [
    "{% for m in messages %}{{ m.content | upper }}<|im_end|>{% endfor %}",  # content transformed
    "{% for m in messages %}{{ m.content }}{{ m.content }}{% endfor %}",  # content written twice
    "{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}{% endfor %}",  # dropped
])
def test_unmappable_template_is_refused_not_guessed(base_tokenizer, source):
    tokenizer, template = Tokenizer(base_tokenizer), ChatTemplate(source)
    with pytest.raises(UserError, match="assistant"):
        encode_conversation(tokenizer, template, CHAT)
    everything = encode_conversation(tokenizer, template, CHAT, train_on="all")  # needs no spans: still works
    assert everything.ids == tokenizer.encode(template.render(CHAT), bos=False) and all(everything.targets)


# --- bad input ----------------------------------------------------------------------------------------------

def test_normalize_conversation_formats():
    openai = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    sharegpt = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"},
                                  {"from": "gpt", "value": "b"}]}
    assert normalize_conversation(openai) == openai["messages"]
    assert normalize_conversation(sharegpt) == [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                                                {"role": "assistant", "content": "b"}]


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]}, "role 'tool'"),
    ({"conversations": [{"from": "bot", "value": "a"}]}, "role 'bot'"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "b"}]}, "no text"),
    ({"text": "a"}, "at least one turn"),
])
def test_bad_conversations(record, message):
    with pytest.raises(UserError, match=message):
        normalize_conversation(record)


def test_no_assistant_turn_when_encoding(base_tokenizer):
    tokenizer = Tokenizer(base_tokenizer)
    with pytest.raises(UserError, match="no assistant turn"):
        encode_conversation(tokenizer, ChatTemplate.from_tokenizer(tokenizer), CHAT[:1])


def test_syntax_error_and_undefined():
    with pytest.raises(UserError, match="does not compile.*line 1"):
        ChatTemplate("{% for m in messages %}{{ m.content }}")
    with pytest.raises(UserError, match="failed to render"):
        ChatTemplate("{{ nothing.at.all }}").render(CHAT)


def test_raise_exception_message_is_shown():
    template = ChatTemplate("{{ raise_exception('Only one user turn, please') }}")
    with pytest.raises(UserError, match="refused the conversation: Only one user turn, please"):
        template.render(CHAT)


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__ }}",
    "{{ messages.append(1) }}",  # immutable: the caller's data cannot be changed
    "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
    "{{ dict.__class__.__subclasses__() }}",
])
def test_sandbox_escapes_are_refused(source):
    with pytest.raises(UserError, match="unsafe|not allowed"):
        ChatTemplate(source).render(CHAT)


def test_missing_template_names_the_fix(base_tokenizer, tmp_path):
    directory = make_tokenizer_dir(base_tokenizer, tmp_path / "plain", "", None, "<|im_end|>", [])
    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="has no chat template; pass --template"):
        ChatTemplate.from_tokenizer(Tokenizer(directory))
    # transformers 5 saves the template beside the config; it is found there
    (directory / "chat_template.jinja").write_text(SMOLLM2)
    assert ChatTemplate.from_tokenizer(Tokenizer(directory)).source == SMOLLM2


def test_sentencepiece_backend_is_refused_clearly(base_tokenizer):
    tokenizer = Tokenizer(base_tokenizer)
    tokenizer.backend = "sentencepiece"  # stands in for a tokenizer.model-only checkpoint
    with pytest.raises(UserError, match="need a tokenizer.json"):
        encode_conversation(tokenizer, ChatTemplate.from_tokenizer(tokenizer), CHAT)
