{#
  Fails with one row per combination of `columns` that occurs more than once (a grain test;
  dbt_utils.unique_combination_of_columns is not installable offline, so it lives here).
#}
{% test unique_combination(model, columns) %}
select {{ columns | join(', ') }}, count(*) as occurrences
from {{ model }}
group by {{ columns | join(', ') }}
having count(*) > 1
{% endtest %}
