#!/usr/bin/env bash
# Draws the "loss" series of one or more metrics.jsonl files as an SVG line chart
# (plain awk: no Python packages needed). Usage: plot_loss.sh OUT.svg LABEL=metrics.jsonl ...
set -euo pipefail
out="$1"; shift
tmp="$(mktemp)"
i=0
for spec in "$@"; do
  label="${spec%%=*}"; file="${spec#*=}"
  # series index, label, step, loss (records without "loss" are eval lines), in any key order
  awk -v s="$i" -v l="$label" 'BEGIN { OFS = "\t" }
    match($0, /"loss":[0-9.eE+-]+/) { loss = substr($0, RSTART + 7, RLENGTH - 7)
      if (match($0, /"step":[0-9]+/)) print s, l, substr($0, RSTART + 7, RLENGTH - 7), loss }' "$file" >> "$tmp"
  i=$((i + 1))
done
# Tab-separated: labels may hold spaces ("base (256)").
awk -F '\t' -v out="$out" '
  { s[NR]=$1; lab[$1]=$2; x[NR]=$3; y[NR]=$4; n=NR
    if (NR==1 || $3>xmax) xmax=$3; if (NR==1 || $4>ymax) ymax=$4; if (NR==1 || $4<ymin) ymin=$4 }
  END {
    W=720; H=420; L=60; R=20; T=30; B=50; if (ymin>0) ymin=0
    split("#1f77b4 #d62728 #2ca02c #9467bd", col, " ")
    printf "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"12\">\n", W, H > out
    printf "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n" > out
    printf "<text x=\"%d\" y=\"18\" font-size=\"14\">training loss (per logged step)</text>\n", L > out
    printf "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", L, H-B, W-R, H-B > out
    printf "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", L, T, L, H-B > out
    for (k=0; k<=4; k++) { v=ymin+(ymax-ymin)*k/4; py=H-B-(H-B-T)*k/4
      printf "<text x=\"5\" y=\"%.1f\">%.3g</text>\n", py+4, v > out }
    printf "<text x=\"%d\" y=\"%d\">step</text>\n", (W+L)/2, H-15 > out
    printf "<text x=\"%d\" y=\"%d\">%d</text>\n", W-R-20, H-B+15, xmax > out
    for (j=1; j<=n; j++) { px=L+(W-L-R)*x[j]/(xmax>0?xmax:1); py=H-B-(H-B-T)*(y[j]-ymin)/((ymax-ymin)>0?(ymax-ymin):1)
      pts[s[j]]=pts[s[j]] sprintf("%.1f,%.1f ", px, py) }
    k=0
    for (q in pts) { c=col[(q%4)+1]
      printf "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"%s\"/>\n", c, pts[q] > out
      printf "<text x=\"%d\" y=\"%d\" fill=\"%s\">%s</text>\n", W-R-200, T+15+15*k, c, lab[q] > out; k++ }
    printf "</svg>\n" > out
  }' "$tmp"
rm -f "$tmp"
