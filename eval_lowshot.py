"""Low-shot evaluation of an MSN backbone (MSN paper Sec. 5; docs/eval.md); after
``pip install .`` the same command is ``msn-eval-lowshot``.

    python eval_lowshot.py backbone=outputs/msn/checkpoints/latest.pt data=imagenet \
        data.root=/data/imagenet shots=[1,2,5] splits=3 percent=1

Prints a table of top-1 accuracy (logistic regression and k-NN, mean +- std over splits),
writes ``results.json``, ``lowshot.png`` and the labelled subsets into ``output_dir``.
Configuration errors are printed as one line ``error: <key>: <message>`` (exit code 2).
"""

from msn.cli import eval_lowshot_main

if __name__ == "__main__":
    eval_lowshot_main()
