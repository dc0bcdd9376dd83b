"""Follow one image edit from its request to its result: the steps the operators and the sensor share.

The lifecycle of an edit, in the order a task meets it (each step one module):

1. :mod:`.request`: check the model's inputs and read the input image before anything is billed
   (and fail the task, without retries, when the server refuses the create for good);
   :mod:`.deadlines` gives the task's deadline on the worker's own clock.
2. :mod:`.reattach`: look up a prediction an earlier try of this task already started, and mark
   "create under way" before a create; :mod:`.orphans` finds, in the account's list, a prediction
   an earlier try created but never recorded.
3. The hook (:mod:`airflow_provider_kontext.hooks.kontext`) creates the prediction; the task waits
   for it, either on the worker (:mod:`.progress`: the poller and its log lines) or in the
   triggerer (:mod:`airflow_provider_kontext.triggers`).
4. :mod:`.events`: the terminal prediction as one small event (the trigger's and the poller's).
5. :mod:`.results`: turn the event into the task's result: fail, or keep the outputs
   (:mod:`.outputs`: durable copies under ``output_path``), push the XComs; :mod:`.lineage` tells
   OpenLineage what was read and written.

The batch operator adds :mod:`.batch_items` (one item per input image), :mod:`.batch_ledger` (each
item's state, recorded as it changes) and :mod:`.batch_results` (the per-image summaries and the
partial-failure verdict).
"""
