"""The prompt format, derived from `tokenize.template` alone.

The template is the text before the response, with `{instruction}` where the instruction goes:
`### HUMAN:\\n{instruction}\\n\\n### RESPONSE:\\n` for the seed recipe, or ChatML's
`<|im_start|>user\\n{instruction}<|im_end|>\\n<|im_start|>assistant\\n`. Everything that depends on the
format reads it from here: the data check that rejects rows containing the format's markers, the
seed-text reader's block markers where the template has that shape, and evaluation's check that an
answer did not start a new turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

PLACEHOLDER = "{instruction}"
SYSTEM_SEPARATOR = "\n\n"  # between a system turn's text and the first user turn's, in data and chat template


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

    def chat_template(self, bos_token: str | None) -> str:
        """A Jinja chat template that renders conversations the way training formatted them, so tools that
        call `apply_chat_template` (vLLM, Ollama, `transformers chat`) prompt the model as it was trained.

        A user turn is `before + content + after`; an assistant turn is its content and EOS; turns follow
        one another with nothing between them. `after` ends with the response marker, so it follows a user
        turn that gets an answer (the generation prompt, or the assistant turn after it). A system turn may
        come first: its text opens the first user turn, then a blank line, as the data reader joins them
        (readers.chat_turns). `bos_token`: written first, for tokenizers that add it when encoding the
        training prompt (Llama 2's `<s>`).
        """
        literal = json.dumps  # a JSON string is a valid Jinja string literal
        return (
            (f"{{{{ {literal(bos_token)} }}}}" if bos_token else "")
            + "{%- set ns = namespace(system='') %}"
            + "{%- for message in messages %}"
            + "{%- if message['role'] == 'system' and loop.first %}"
            + f"{{%- if message['content'] | trim %}}{{%- set ns.system = (message['content'] | trim) + {literal(SYSTEM_SEPARATOR)} %}}{{%- endif %}}"
            + "{%- elif message['role'] == 'user' %}"
            + f"{{{{ {literal(self.before)} + ns.system + message['content'] }}}}{{%- set ns.system = '' %}}"
            + f"{{%- if not loop.last or add_generation_prompt %}}{{{{ {literal(self.after)} }}}}{{%- endif %}}"
            + "{%- elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
            + "{%- else %}{{ raise_exception('this model was fine-tuned on user and assistant turns, with an optional "
            + "system turn first; leave out ' + message['role'] + ' messages') }}"
            + "{%- endif %}{%- endfor %}"
        )
