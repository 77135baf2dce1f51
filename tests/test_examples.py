"""Per-example reduction under padded, padding-free and packed layouts."""

import torch

from minorsft_trl.examples import ExampleIndex

X = -100  # ignored label


def test_padded_batch_has_one_example_per_row():
    labels = torch.tensor([[X, X, 5, 6, 7], [X, 8, 9, X, X], [X, X, X, X, X]])
    index = ExampleIndex.from_batch(labels)
    # Row 2 has no answer token: left out, not a zero-length example
    assert index.num_examples == 2
    torch.testing.assert_close(index.num_tokens, torch.tensor([3.0, 2.0]))
    per_token = torch.arange(8.0).view(2, 4).repeat(2, 1)[:3] + 0.5  # (3, 4) predictions
    # Predictions t score token t + 1: row 0 answers at t = 1, 2, 3; row 1 at t = 0, 1
    torch.testing.assert_close(index.sum(per_token), torch.tensor([1.5 + 2.5 + 3.5, 4.5 + 5.5]))


def test_padding_free_row_is_split_where_positions_restart():
    # Three examples flattened in one row, as TRL's padding-free collator builds it (first label of each is -100)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    labels = torch.tensor([[X, X, 5, X, 6, X, X, 7, 8]])
    index = ExampleIndex.from_batch(labels, position_ids)
    assert index.num_examples == 3
    torch.testing.assert_close(index.num_tokens, torch.tensor([1.0, 1.0, 2.0]))
    per_token = torch.arange(1.0, 9.0)[None]  # scores tokens 1..8
    torch.testing.assert_close(index.sum(per_token), torch.tensor([2.0, 4.0, 7.0 + 8.0]))


def test_a_label_on_the_first_token_of_an_example_is_not_scored():
    # A collator that leaves the first label of the second example: predicting it from the previous example is no
    # answer token of either example
    position_ids = torch.tensor([[0, 1, 2, 0, 1]])
    labels = torch.tensor([[X, 4, 5, 6, 7]])
    index = ExampleIndex.from_batch(labels, position_ids)
    torch.testing.assert_close(index.num_tokens, torch.tensor([2.0, 1.0]))
    assert not index.answer_mask[0, 2]


def test_padded_and_padding_free_layouts_give_the_same_per_example_sums():
    generator = torch.Generator().manual_seed(0)
    lengths = [4, 6, 3]
    answers_from = [2, 1, 2]
    token_values = [torch.randn(n, generator=generator) for n in lengths]  # value of predicting each token

    padded_labels = torch.full((3, 6), X)
    padded_scores = torch.zeros(3, 5)
    for row, (n, start, values) in enumerate(zip(lengths, answers_from, token_values, strict=True)):
        padded_labels[row, start:n] = 1
        padded_scores[row, : n - 1] = values[1:]
    flat_labels = torch.cat([padded_labels[row, :n] for row, n in enumerate(lengths)])[None]
    flat_positions = torch.cat([torch.arange(n) for n in lengths])[None]
    flat_scores = torch.cat([values for values in token_values])[None, 1:]

    padded = ExampleIndex.from_batch(padded_labels)
    flat = ExampleIndex.from_batch(flat_labels, flat_positions)
    torch.testing.assert_close(padded.sum(padded_scores), flat.sum(flat_scores))
    torch.testing.assert_close(padded.num_tokens, flat.num_tokens)


def test_batch_without_answer_tokens_has_no_examples():
    index = ExampleIndex.from_batch(torch.full((2, 4), X))
    assert index.num_examples == 0
    per_token = torch.randn(2, 3, requires_grad=True)
    sums = index.sum(per_token)
    assert sums.shape == (0,)
    sums.sum().backward()
    assert torch.equal(per_token.grad, torch.zeros(2, 3))
