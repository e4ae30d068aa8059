"""One module per stage, each thin glue readable top to bottom: take the
decoded events, apply the domain rules through the ports, return what to emit
next. The contract is in contract.py, the table of stages in pipeline.py;
nothing here imports infra/."""
