"""Every ``curlprune`` sub-command, one module per family; :mod:`curlprune.cli` builds the parser.

    inspect.py   groups, count, export
    demo.py      demo
    prune.py     prune
    run.py       run, finetune, distill, refine
"""
