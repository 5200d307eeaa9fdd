"""The prompt format, derived from `tokenize.template` alone.

The template is the text before the response, with `{instruction}` where the instruction goes:
`### HUMAN:\\n{instruction}\\n\\n### RESPONSE:\\n` for the seed recipe, or ChatML's
`<|im_start|>user\\n{instruction}<|im_end|>\\n<|im_start|>assistant\\n`. Everything that depends on the
format reads it from here: the data check that rejects rows containing the format's markers, the
seed-text reader's block markers where the template has that shape, and evaluation's check that an
answer did not start a new turn.
"""

from __future__ import annotations

from dataclasses import dataclass

PLACEHOLDER = "{instruction}"


@dataclass(frozen=True)
class PromptFormat:
    template: str

    @property
    def before(self) -> str:
        """Text before the instruction: `### HUMAN:\\n`."""
        return self.template.split(PLACEHOLDER, 1)[0]

    @property
    def after(self) -> str:
        """Text after the instruction, up to the response: `\\n\\n### RESPONSE:\\n`."""
        return self.template.split(PLACEHOLDER, 1)[1]

    def prompt(self, instruction: str) -> str:
        return self.template.replace(PLACEHOLDER, instruction)

    @property
    def markers(self) -> tuple[str, ...]:
        """The template's own lines, stripped: a row containing one would shift the loss mask."""
        lines = (line.strip() for part in (self.before, self.after) for line in part.splitlines())
        return tuple(dict.fromkeys(line for line in lines if line))

    @property
    def turn_start(self) -> str | None:
        """What opens a user turn (`### HUMAN:`); an answer that writes it has run into a new turn.
        None when the template opens with the instruction itself."""
        return self.before.strip() or None

    @property
    def line_markers(self) -> tuple[str, str] | None:
        """(instruction marker, response marker) when each stands on a line of its own around the
        instruction, as in the seed's `### HUMAN:` / `### RESPONSE:`; None for other shapes."""
        before, after = self.before.strip(), self.after.strip()
        shaped = self.before.endswith("\n") and self.after.startswith("\n") and self.after.endswith("\n")
        if shaped and before and after and "\n" not in before and "\n" not in after:
            return before, after
        return None
