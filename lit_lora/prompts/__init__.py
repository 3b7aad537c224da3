"""Prompt formats: how a question or a conversation becomes the text a model continues. Nothing here imports torch.

    builtin.py         the built-in formats (chatml, llama3, alpaca, plain), one entry each: its single-turn form,
                       its chat template, the special tokens it needs, where its answers stop
    chat_template.py   chat templates (the checkpoint's own, a built-in's, a .jinja file) rendered as transformers
                       renders them, in Jinja's sandbox
    masking.py         which tokens of a rendered conversation are trained on, and each assistant turn's end marker
    format.py          PromptFormat: the format prepared data and adapters record, and that generate, chat and
                       evaluate ask in
"""
