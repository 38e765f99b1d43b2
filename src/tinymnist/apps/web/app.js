// Draw on the canvas; send it as PNG to /api/predict while drawing, with at most one request in flight and at
// most one every MIN_GAP ms, and once more when the stroke ends. The server does all the preprocessing.
"use strict";
const MIN_GAP = 150;
const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const digitEl = document.getElementById("digit");
const messageEl = document.getElementById("message");
const topEl = document.getElementById("top");
const input28 = document.getElementById("input28");
let drawing = false, last = null, inFlight = false, pending = false, lastSent = 0, timer = null, generation = 0;
// The canvas's version, and the version of the answer on show, as body data attributes: whoever needs to know
// that the page shows the answer for the final drawing (a test on a slow machine) compares the two.
let version = 0;

function changed() {
  version += 1;
  document.body.dataset.drawn = String(version);
}

function reset() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  generation += 1;  // answers to requests sent before the clear are dropped
  changed();
  showNothing("Draw a digit.");
  document.body.dataset.answered = String(version);  // a blank canvas has its answer: nothing
}

function showNothing(message) {
  digitEl.textContent = "–";
  messageEl.textContent = message;
  topEl.replaceChildren();
  const c = input28.getContext("2d");
  c.fillStyle = "#000";
  c.fillRect(0, 0, input28.width, input28.height);
  document.body.dataset.digit = "";
}

function show(answer) {
  if (answer.digit === null || answer.digit === undefined) {
    showNothing(answer.message || answer.error || "Draw a digit.");
    return;
  }
  digitEl.textContent = String(answer.digit);
  messageEl.textContent = "";
  document.body.dataset.digit = String(answer.digit);
  topEl.replaceChildren(...answer.top.map(({ digit, probability }) => {
    const li = document.createElement("li");
    const bar = document.createElement("div");
    const fill = document.createElement("span");
    bar.className = "bar";
    fill.style.width = `${(100 * probability).toFixed(1)}%`;
    bar.append(fill);
    li.append(String(digit), bar, `${(100 * probability).toFixed(1)}%`);
    return li;
  }));
  const c = input28.getContext("2d");
  const img = c.createImageData(28, 28);
  answer.input28.forEach((row, y) => row.forEach((v, x) => {
    const i = 4 * (28 * y + x);
    img.data[i] = img.data[i + 1] = img.data[i + 2] = v;
    img.data[i + 3] = 255;
  }));
  const tmp = document.createElement("canvas");
  tmp.width = tmp.height = 28;
  tmp.getContext("2d").putImageData(img, 0, 0);
  c.imageSmoothingEnabled = false;
  c.drawImage(tmp, 0, 0, input28.width, input28.height);
}

async function send() {
  if (inFlight) { pending = true; return; }
  inFlight = true;
  pending = false;
  lastSent = performance.now();
  const sentFor = generation, sentVersion = version;
  try {
    const png = await new Promise((resolve) => pad.toBlob(resolve, "image/png"));
    const response = await fetch("/api/predict", { method: "POST", body: png, headers: { "Content-Type": "image/png" } });
    const answer = await response.json();
    if (sentFor === generation) show(answer);
  } catch (err) {
    if (sentFor === generation) showNothing(`The server did not answer (${err}).`);
  } finally {
    if (sentFor === generation) document.body.dataset.answered = String(sentVersion);
    inFlight = false;
    if (pending) schedule();
  }
}

function schedule() {
  if (timer) return;
  const wait = Math.max(0, MIN_GAP - (performance.now() - lastSent));
  timer = setTimeout(() => { timer = null; send(); }, wait);
}

function point(e) {
  const r = pad.getBoundingClientRect();
  return { x: (e.clientX - r.left) * pad.width / r.width, y: (e.clientY - r.top) * pad.height / r.height };
}

pad.addEventListener("pointerdown", (e) => {
  drawing = true;
  last = point(e);
  pad.setPointerCapture(e.pointerId);
  ctx.fillStyle = "#000";
  ctx.beginPath();
  ctx.arc(last.x, last.y, 11, 0, 2 * Math.PI);
  ctx.fill();
  changed();
});
pad.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  const p = point(e);
  ctx.strokeStyle = "#000";
  ctx.lineWidth = 22;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(last.x, last.y);
  ctx.lineTo(p.x, p.y);
  ctx.stroke();
  last = p;
  changed();
  schedule();
});
const end = () => { if (drawing) { drawing = false; schedule(); } };
pad.addEventListener("pointerup", end);
pad.addEventListener("pointercancel", end);
document.getElementById("clear").addEventListener("click", reset);
// for tests that paint the canvas directly: the canvas changed, send it
window.tinymnist = { send: () => { changed(); return send(); }, reset };
reset();
