{#
  Fails with every row for which the boolean SQL `expression` is false. NULL counts as
  passing, as in SQL's CHECK constraints: guard nullable columns in the expression if needed.
#}
{% test expression_is_true(model, expression) %}
select *
from {{ model }}
where not ({{ expression }})
{% endtest %}
