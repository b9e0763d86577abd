"""The self-study tasks: short tasks about a context whose answers, written by the model itself,
supply reference queries (`queries: "self-study"` on the server, the `self-study` query source
of bench/fidelity.py). Shared so that both ask the same."""

TASKS = (
    "Summarize the text above in a few sentences.",
    "List the key facts of the text above: names, numbers, places and dates.",
    "Ask a question about a detail of the text above, then answer it.",
)
ANSWER_TOKENS = 128  # per task
