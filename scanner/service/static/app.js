// The prompt page: explain the prompt as it is typed, highlight words, drop words on click.
"use strict";

const METHOD = "ablation"; // its word scores are exactly "how much dropping this word lowers the score"
const TOKEN_KEY = "memscan-token"; // a service started with a token: asked once, kept for the browser session
const DEBOUNCE_MS = 200;

const $ = (id) => document.getElementById(id);
let latestRequest = 0; // responses to older requests are ignored
let timer = null;

function dropSpan(text, start, end) {
  // Same rule as scanner.explain.drop_word: cut the word, join what is left with one space.
  const left = text.slice(0, start).trimEnd();
  const right = text.slice(end).trimStart();
  return left && right ? `${left} ${right}` : left + right;
}

function setPrompt(text) {
  $("prompt").value = text;
  schedule(0);
}

function schedule(delay) {
  clearTimeout(timer);
  timer = setTimeout(update, delay);
}

async function update() {
  const prompt = $("prompt").value;
  const id = ++latestRequest;
  if (!prompt.trim()) {
    render(null, prompt);
    return;
  }
  $("busy").hidden = false;
  try {
    const headers = { "Content-Type": "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch("/v1/explain", {
      method: "POST",
      headers,
      body: JSON.stringify({ prompt, method: METHOD }),
    });
    const body = await response.json();
    if (id !== latestRequest) return;
    $("auth").hidden = response.status !== 401;
    if (response.status === 401) {
      if (token) sessionStorage.removeItem(TOKEN_KEY); // a wrong one: ask again
      $("token").focus();
      return;
    }
    if (!response.ok) throw new Error(body.error + (body.detail ? `: ${JSON.stringify(body.detail)}` : ""));
    $("error").hidden = true;
    render(body, prompt);
  } catch (err) {
    if (id !== latestRequest) return;
    $("error").textContent = `Could not score the prompt (${err.message}).`;
    $("error").hidden = false;
  } finally {
    if (id === latestRequest) $("busy").hidden = true;
  }
}

function render(result, prompt) {
  const verdict = $("verdict");
  const words = $("words");
  const suggestions = $("suggestions");
  words.replaceChildren();
  suggestions.replaceChildren();
  $("suggest-box").hidden = true;
  $("truncated").hidden = !(result && result.truncated);
  if (!result) {
    verdict.dataset.state = "idle";
    verdict.textContent = "type a prompt";
    $("score").textContent = "–";
    $("threshold").textContent = "";
    return;
  }
  $("score").textContent = result.score.toFixed(4);
  if (result.threshold === null) {
    verdict.dataset.state = "none";
    verdict.textContent = "no threshold set";
    $("threshold").textContent = "";
  } else {
    verdict.dataset.state = result.flagged ? "flagged" : "safe";
    verdict.textContent = result.flagged ? "FLAGGED: likely memorized" : "safe";
    $("threshold").textContent = `(threshold ${Number(result.threshold.toPrecision(3))})`;
  }
  const top = Math.max(0, ...result.words.map((w) => w.share));
  result.words.forEach((word, i) => {
    const span = document.createElement("span");
    span.className = "word";
    span.dataset.index = i;
    span.textContent = word.word;
    const strength = top > 0 ? word.share / top : 0;
    span.style.background = `rgba(220, 40, 30, ${(0.75 * strength).toFixed(3)})`;
    span.title = `${(100 * word.share).toFixed(0)}% of the significance; click to drop` +
      (word.score_without === null ? "" : ` (score without it: ${word.score_without.toFixed(4)})`);
    span.addEventListener("click", () => setPrompt(dropSpan(prompt, word.start, word.end)));
    words.append(span, " ");
  });
  const suggestion = result.suggestion; // only for a flagged prompt: the words that together make it safe
  if (suggestion) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.className = "suggestion";
    const dropped = suggestion.words.map((i) => `“${result.words[i].word}”`).join(", ");
    button.textContent = `drop ${dropped} → score ${suggestion.score.toFixed(4)}` +
      (suggestion.safe ? " (safe)" : " (still flagged)");
    button.addEventListener("click", () => setPrompt(suggestion.prompt));
    item.append(button);
    suggestions.append(item);
  }
  $("suggest-box").hidden = !suggestion;
}

$("auth").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("auth").hidden = true;
  schedule(0);
});

$("prompt").addEventListener("input", () => schedule(DEBOUNCE_MS));
if ($("prompt").value) schedule(0);
