"""The batched logit scorer in common.py against a slow, obviously correct reference.

The reference scores one sequence at a time, unpadded, with a full float64
log-softmax over the model's own logits. The batched scorer must agree to 1e-4
whatever the batch size, token budget, chunking, padding and input order.
"""
import pytest
import torch

import common

PROMPTS = [
    "Give three tips for staying healthy.",
    "Give three tips for staying healthy.",  # same prompt, second sample
    "¿Cómo podemos reducir la contaminación del aire?",
    "Объясни, почему небо голубое.",
    "用一句话描述你自己。",
    "Say hello.",
    "Say hello.",
    "Write a haiku.",
    "Classify the following into animals, plants, and minerals\nOak tree, copper ore, elephant",
]
RESPONSES = [
    "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep at least seven hours a night.",
    "Drink water, walk every day, and sleep well.",
    "Podemos usar más el transporte público y plantar árboles en las ciudades.",
    "Из-за рассеяния Рэлея: короткие волны рассеиваются сильнее.",
    "我是一个乐于助人的助手。",
    "\n\nHi there",     # BPE merges this "\n" with the template's final "\n" into one token
    "",                 # empty answer: only the end-of-turn token is scored
    "Autumn moonlight—\na worm digs silently\ninto the chestnut.  ",
    "Oak tree: plant\nCopper ore: mineral\nElephant: animal",
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    return common.load_model(tiny_model, device=torch.device("cpu"), dtype=torch.float32)


def generation_view(tokenizer, prompt, response):
    """The ids a model sees when it generated `response`: the chat prompt, the answer's own tokens, end-of-turn."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt_ids = common.chat_prompt_ids(tokenizer, prompt)
    return prompt_ids + tokenizer(response, add_special_tokens=False).input_ids + [im_end], len(prompt_ids)


def reference_score(model, ids, prompt_length):
    """Sum of log p(token | everything before) over the response tokens, one sequence, float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logps = logits.log_softmax(dim=-1)
    per_token = [logps[t - 1, ids[t]].item() for t in range(prompt_length, len(ids))]
    return sum(per_token), per_token


@pytest.fixture(scope="module")
def reference(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    return [reference_score(model, *generation_view(tokenizer, p, r)) for p, r in zip(PROMPTS, RESPONSES)]


def test_tokenisation_is_what_generation_sees(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    for prompt, response in zip(PROMPTS, RESPONSES):
        ids, prompt_length = common.tokenize_prompt_response(tokenizer, prompt, response)
        assert (ids, prompt_length) == generation_view(tokenizer, prompt, response), repr(response)


def test_boundary_merge_is_not_scored(model_and_tokenizer):
    """"\n\nHi": tokenised jointly the template's "\n" and the answer's first "\n" become 'ĊĊ'."""
    _, tokenizer = model_and_tokenizer
    prompt_ids = common.chat_prompt_ids(tokenizer, "Say hello.")
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    joint = tokenizer(prompt_text + "\n\nHi there", add_special_tokens=False).input_ids
    assert joint[:len(prompt_ids)] != prompt_ids  # the merge really happens with this tokenizer
    assert tokenizer.convert_ids_to_tokens(joint[len(prompt_ids) - 1]) == "ĊĊ"
    ids, prompt_length = common.tokenize_prompt_response(tokenizer, "Say hello.", "\n\nHi there")
    assert ids[:prompt_length] == prompt_ids  # the prompt exactly as the model saw it
    assert tokenizer.convert_ids_to_tokens(ids[prompt_length:]) == ["Ċ", "Ċ", "Hi", "Ġthere", "<|im_end|>"]
    assert tokenizer.decode(ids[prompt_length:-1]) == "\n\nHi there"


def test_end_of_turn_scored_and_single_bos(model_and_tokenizer, reference):
    model, tokenizer = model_and_tokenizer
    summed, counts, per_token = common.score(model, tokenizer, PROMPTS, RESPONSES, per_token=True, show_progress=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for index, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        ids, prompt_length = common.tokenize_prompt_response(tokenizer, prompt, response)
        assert ids[-1] == im_end and ids[-2] != im_end
        assert counts[index] == len(tokenizer(response, add_special_tokens=False).input_ids) + 1
        assert per_token[index][-1].item() == pytest.approx(reference[index][1][-1], abs=1e-5)  # the end-of-turn
        assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id  # no double BOS
    assert counts[RESPONSES.index("")] == 1


@pytest.mark.parametrize("token_budget,chunk_rows", [(1, None), (80, 7), (300, 1), (10 ** 6, None), (10 ** 6, 5)])
def test_score_matches_reference(model_and_tokenizer, reference, token_budget, chunk_rows):
    """One pair per batch, a few per batch, everything in one padded batch; any chunking of the output layer."""
    model, tokenizer = model_and_tokenizer
    summed, counts, per_token = common.score(model, tokenizer, PROMPTS, RESPONSES, token_budget=token_budget,
                                             per_token=True, show_progress=False, chunk_rows=chunk_rows)
    assert summed.dtype == torch.float64 and counts.dtype == torch.long
    for index, (expected_sum, expected_tokens) in enumerate(reference):
        assert summed[index].item() == pytest.approx(expected_sum, abs=1e-4)
        assert counts[index].item() == len(expected_tokens)
        assert torch.allclose(per_token[index].double(), torch.tensor(expected_tokens, dtype=torch.float64), atol=1e-5)


def test_order_is_restored(model_and_tokenizer, reference):
    model, tokenizer = model_and_tokenizer
    order = [4, 0, 8, 2, 6, 1, 7, 3, 5]
    summed, counts = common.score(model, tokenizer, [PROMPTS[i] for i in order], [RESPONSES[i] for i in order],
                                  token_budget=120, show_progress=False)
    for position, index in enumerate(order):
        assert summed[position].item() == pytest.approx(reference[index][0], abs=1e-4)
        assert counts[position].item() == len(reference[index][1])


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
@pytest.mark.parametrize("token_budget", [1, 10 ** 6])
def test_next_token_logps_match_reference(tmp_path, architecture, token_budget):
    """Every candidate after every prompt, from one forward per prompt, equals the reference's log-prob of that
    candidate scored as the next token (Gemma 2: its soft-capped logits), padded or alone, in the order given."""
    from conftest import make_tiny_model
    model, tokenizer = common.load_model(make_tiny_model(tmp_path, architecture=architecture),
                                         device=torch.device("cpu"), dtype=torch.float32)
    prompts = [common.chat_prompt_ids(tokenizer, text) for text in PROMPTS]
    candidates = [tokenizer(letter, add_special_tokens=False).input_ids[0] for letter in "ABCD"]
    model.train()
    logps = common.next_token_logps(model, prompts, candidates, token_budget=token_budget)
    assert model.training and logps.shape == (len(PROMPTS), 4) and logps.dtype == torch.float64
    for row, ids in enumerate(prompts):
        for column, token in enumerate(candidates):
            expected, _ = reference_score(model, ids + [token], len(ids))
            assert logps[row, column].item() == pytest.approx(expected, abs=1e-5)


def test_score_leaves_training_mode(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.train()
    common.score(model, tokenizer, PROMPTS[:1], RESPONSES[:1], show_progress=False)
    assert model.training
    model.eval()


def test_unknown_logit_transform_is_refused(tmp_path, tiny_model):
    """A model whose logits are not output_layer(decoder(x)) would be scored wrongly; it must fail loudly,
    when it loads (one line naming it), and from check_scoring_path for a model the user built."""
    model, tokenizer = common.load_model(tiny_model, device=torch.device("cpu"), dtype=torch.float32)
    model.config.final_logit_softcapping = 0.5  # Llama ignores this, so our own output path would disagree
    with pytest.raises(ValueError, match="does not reproduce the model's logits"):
        common.check_scoring_path(model)
    model.save_pretrained(tmp_path / "capped")
    tokenizer.save_pretrained(tmp_path / "capped")
    with pytest.raises(common.InputError, match="capped: LlamaForCausalLM: output_layer.*does not reproduce"):
        common.load_model(str(tmp_path / "capped"), device=torch.device("cpu"), dtype=torch.float32)
    # Generation alone reads no log-probs of ours: 01 and 02 load such a model and generate with it.
    generator, _, _ = common.check_engine(str(tmp_path / "capped"))()
    assert generator.config.final_logit_softcapping == 0.5
    assert not [name for name in vars(model) if "scor" in name]  # nothing of ours written onto the user's model


def test_models_load_without_hub_kernels(tiny_model):
    """transformers' default would swap in compiled kernels fetched from the hub on a GPU (and fail offline, as it
    did on the first GPU run): the loop loads models with the code their library ships, nothing fetched."""
    model, _ = common.load_model(tiny_model, device=torch.device("cpu"), dtype=torch.float32)
    assert model.use_kernels is False


def section_source(path, header, next_header):
    """The text of a file from the line starting with `header` to the line before `next_header`."""
    text = open(path, encoding="utf-8").read()
    start = text.index(header)
    return text[start:text.index(next_header, start)]


def test_scorer_and_dpo_loss_copy_out_whole(tiny_model):
    """The two pieces users copy run alone, in a namespace holding only torch (and F), and give the project's
    own numbers: the scorer section of common.py, and dpo_loss from 04_dpo.py."""
    import importlib.util
    import inspect
    import os
    from conftest import REPO
    scorer_source = section_source(os.path.join(REPO, "common.py"), "# 8. The log-prob scorer", "# 9. ")
    scorer = {"torch": torch}
    exec(compile(scorer_source, "scorer-section", "exec"), scorer)
    assert "import" not in scorer_source.replace("`import torch`", "")  # it needs nothing but torch
    spec = importlib.util.spec_from_file_location("dpo", os.path.join(REPO, "04_dpo.py"))
    dpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dpo)
    loss_namespace = {"torch": torch, "F": torch.nn.functional}
    exec(compile(inspect.getsource(dpo.dpo_loss), "dpo-loss", "exec"), loss_namespace)

    model, tokenizer = common.load_model(tiny_model, device=torch.device("cpu"), dtype=torch.float32)
    scorer["check_scoring_path"](model)
    sequences = [common.tokenize_prompt_response(tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    with torch.no_grad():
        ours = common.response_logps(model, sequences)
        copied = scorer["response_logps"](model, sequences)
        _, per_token = scorer["response_logps"](model, sequences, per_token=True)
    assert torch.allclose(copied, ours, rtol=0, atol=1e-6) and len(per_token) == len(sequences)
    logps = ours[:8].reshape(4, 2).T.float()
    arguments = (logps[0], logps[1], logps[0] - 0.5, logps[1] + 0.25, 0.1, "sigmoid", 0.0, 1.0, torch.tensor([3, 4, 5, 6]))
    for expected, got in zip(dpo.dpo_loss(*arguments), loss_namespace["dpo_loss"](*arguments)):
        assert torch.equal(expected, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_equals_log_softmax(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 1000, generator=generator) * 5).to(dtype).requires_grad_()
    labels = torch.randint(0, 1000, (37,), generator=generator)
    ours = common.token_logps(logits, labels, chunk_rows=8)
    expected = logits.double().log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours.double(), expected, atol=1e-5)
    (gradient,) = torch.autograd.grad(ours.sum(), logits)
    (expected_gradient,) = torch.autograd.grad(expected.sum(), logits)
    assert torch.allclose(gradient.float(), expected_gradient.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_length_batches_respect_budget():
    lengths = [5, 40, 12, 40, 7, 90, 1, 33, 33, 200, 38, 36]
    batches = common.length_batches(lengths, token_budget=160)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        padding = len(batch) * longest - sum(lengths[i] for i in batch)
        assert len(batch) == 1 or (len(batch) * longest <= 160 and padding <= 0.2 * len(batch) * longest)
        assert lengths[batch[0]] == longest
    assert batches[:3] == [[9], [5], [1, 3, 10, 11]]  # 200 is over the budget: alone; 90 with 40 would be half pads
    assert common.length_batches([], 100) == []


def test_pad_right():
    input_ids, attention_mask = common.pad_right([[1, 2, 3], [4]], pad_id=0)
    assert input_ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.slow
def test_embedded_model_matches_reference():
    model, tokenizer = common.load_model(common.EMBEDDED_MODEL, device=torch.device("cpu"), dtype=torch.float32)
    prompts, responses = PROMPTS[:4] + PROMPTS[5:6], RESPONSES[:4] + RESPONSES[5:6]
    summed, counts = common.score(model, tokenizer, prompts, responses, token_budget=200, show_progress=False)
    for index, (prompt, response) in enumerate(zip(prompts, responses)):
        expected, tokens = reference_score(model, *generation_view(tokenizer, prompt, response))
        assert summed[index].item() == pytest.approx(expected, abs=1e-4)
        assert counts[index].item() == len(tokens)
