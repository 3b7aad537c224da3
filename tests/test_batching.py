import numpy as np
import torch

from lit_lora.data.batching import collate, epoch_order, pack, step_micro_batches
from lit_lora.data.dataset import IGNORE_INDEX
from lit_lora.model import LLaMA
from conftest import tiny_config


def example(ids: list[int], prompt_len: int) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor(ids)
    labels = input_ids.clone()
    labels[:prompt_len] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


def test_collate_pads_right_to_the_longest_and_shifts_targets():
    batch = collate([example([5, 6, 7], 1), example([8, 9, 10, 11, 12], 2)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    # targets[t] is the label of token t+1; prompt, the last position and padding are ignored
    assert batch["targets"].tolist() == [[6, 7, -100, -100, -100], [-100, 10, 11, 12, -100]]


def test_epoch_order_is_deterministic_whole_batches_and_grouped_by_length():
    lengths = np.random.default_rng(0).integers(1, 500, size=203)
    a = epoch_order(lengths, 8, seed=1, epoch=0, group_by_length=True)
    assert a == epoch_order(lengths, 8, seed=1, epoch=0, group_by_length=True)
    assert a != epoch_order(lengths, 8, seed=1, epoch=1, group_by_length=True)
    assert len(a) == 200 and len(set(a)) == 200
    spread = lambda order: np.mean([np.ptp(lengths[order[i:i + 8]]) for i in range(0, 200, 8)])  # noqa: E731
    assert spread(a) < 0.5 * spread(epoch_order(lengths, 8, seed=1, epoch=0, group_by_length=False))


def test_processes_and_micro_batches_split_each_global_batch_exactly():
    order = list(range(32))
    one = sum(step_micro_batches(order, 1, 16, 8, rank=0, world_size=1), [])
    two = [sum(step_micro_batches(order, 1, 16, 4, rank=r, world_size=2), []) for r in range(2)]
    assert sorted(one) == sorted(two[0] + two[1]) == list(range(16, 32))


def test_packing_matches_separate_sequences():
    torch.manual_seed(0)
    model = LLaMA(tiny_config(64)).eval()
    model.init_weights(0)
    examples = [example([3, 4, 5, 6], 1), example([7, 8, 9], 1), example([10, 11, 12, 13, 14], 2)]
    packed = pack(examples, pad_id=0, max_seq_length=9)
    assert packed["input_ids"].shape[0] == 2  # 4 + 3 fit in one row of 9, 5 goes to the next
    assert packed["input_pos"][0].tolist() == [0, 1, 2, 3, 0, 1, 2]
    with torch.no_grad():
        logits = model(packed["input_ids"], packed["input_pos"], packed["mask"])
        alone = [model(e["input_ids"][None])[0] for e in examples]
    torch.testing.assert_close(logits[0, :4], alone[0])
    torch.testing.assert_close(logits[0, 4:7], alone[1])  # no attention into the first example
    torch.testing.assert_close(logits[1, :5], alone[2])
    padded = collate(examples, pad_id=0)
    assert sorted(packed["targets"][packed["targets"] != -100].tolist()) == \
        sorted(padded["targets"][padded["targets"] != -100].tolist())


def test_pad_multiple_rounds_the_length_up_within_max_seq_length_and_leaves_the_loss_alone():
    from lit_lora.loss import micro_batch_loss

    examples = [example([5, 6, 7], 1), example([8, 9, 10, 11, 12], 2)]
    assert collate(examples, pad_id=0, pad_multiple=4)["input_ids"].shape == (2, 8)
    assert collate(examples, pad_id=0, pad_multiple=4, max_seq_length=6)["input_ids"].shape == (2, 6)
    assert collate(examples, pad_id=0, pad_multiple=16, max_seq_length=4)["input_ids"].shape == (2, 5)  # never cut
    assert pack(examples, pad_id=0, max_seq_length=16, pad_multiple=16)["input_ids"].shape == (1, 16)
    torch.manual_seed(0)
    model = LLaMA(tiny_config(64)).eval()
    model.init_weights(0)
    with torch.no_grad():
        exact = micro_batch_loss(model, collate(examples, pad_id=0), 4)
        rounded = micro_batch_loss(model, collate(examples, pad_id=0, pad_multiple=16), 4)
    torch.testing.assert_close(rounded, exact)
