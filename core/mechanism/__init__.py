"""The mechanism lab: which learning algorithm does the model run in context?

- `toys`: known-answer models (a GD-constructed and a trained linear self-attention
  layer, a softmax kernel head, a lookup) that every measurement must read correctly;
- `weights`: the effective weight of each in-context y in a prediction, measured by
  perturbing y_i, and each estimator's weights in closed form;
- `agreement`: how far the model's predictions are from each estimator's, against
  how far the estimators are from each other on the same seeds.
"""
